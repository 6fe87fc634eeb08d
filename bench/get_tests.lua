-- GET /tests?clinic_id=<random pre-filled clinic C0001..C1000>.
-- Usage: wrk ... -s get_tests.lua URL -- NONCE   (NONCE, 8 hex digits, only seeds the choice)

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

local CLINICS = 1000
local headers = with_auth({})

function init(args)
   math.randomseed(tonumber(args[1] or "0", 16) + 7919 * (thread_no or 0))
end

function request()
   return wrk.format("GET", string.format("/tests?clinic_id=C%04d", math.random(CLINICS)), headers)
end
