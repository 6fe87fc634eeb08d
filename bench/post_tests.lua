-- POST /tests with realistic records (record.lua, which mirrors records_gen.make_record) and ids
-- unique across threads and runs: b<nonce>-<thread>-<counter> (records_gen.bench_test_id).
-- Usage: wrk ... -s post_tests.lua URL -- NONCE   where NONCE is 8 hex digits, new for every run.
-- clinic_id is one of the pre-filled C0001..C1000. BENCH_AUTHORIZATION, when set, goes with
-- every request (with_auth, common.lua).

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")
dofile(dir .. "record.lua")

local CLINICS = 1000

local nonce = "00000000"
local counter = 0
local headers = with_auth({["Content-Type"] = "application/json"})

function init(args)
   nonce = args[1] or nonce
   seed_random(nonce)
end

function request()
   counter = counter + 1
   local body = record_json(string.format("b%s-%02d-%07d", nonce, thread_no or 0, counter),
                            string.format("C%04d", math.random(CLINICS)), string.format("P%06d", math.random(999999)))
   return wrk.format("POST", "/tests", headers, body)
end
