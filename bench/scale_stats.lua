-- GET /tests/_stats?clinic_id=<random clinic C0001..C<CLINICS>>, for bench_scale.py.
-- Usage: wrk ... -s scale_stats.lua URL -- NONCE CLINICS

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

local clinics = 500

function init(args)
   math.randomseed(tonumber(args[1] or "0", 16) + 7919 * (thread_no or 0))
   clinics = tonumber(args[2] or "500")
end

function request()
   return wrk.format("GET", string.format("/tests/_stats?clinic_id=C%04d", math.random(clinics)))
end
