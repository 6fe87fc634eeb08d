-- GET /tests/seed-NNNNNNN: one random pre-filled record.
-- Usage: wrk ... -s get_record.lua URL -- NONCE RECORDS   (NONCE, 8 hex digits, only seeds the choice)

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

local records = 1
local headers = with_auth({})

function init(args)
   records = tonumber(args[2])
   seed_random(args[1])
end

function request()
   return wrk.format("GET", string.format("/tests/seed-%07d", math.random(records)), headers)
end
