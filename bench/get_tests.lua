-- GET <PATH>?clinic_id=<random clinic C0001..C<CLINICS>>.
-- Usage: wrk ... -s get_tests.lua URL -- NONCE [CLINICS [PATH]]   (NONCE, 8 hex digits, only seeds the choice)
--   CLINICS: default 1000, the clinics bench_core.py pre-fills; PATH: default /tests (a clinic's
--   page); bench_scale.py passes its clinic count and /tests/_stats.

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

local clinics, path = 1000, "/tests"
local headers = with_auth({})

function init(args)
   seed_random(args[1])
   clinics = tonumber(args[2] or clinics)
   path = args[3] or path
end

function request()
   return wrk.format("GET", string.format("%s?clinic_id=C%04d", path, math.random(clinics)), headers)
end
