-- POST /tests with realistic records (mirrors records_gen.make_record) and ids unique across
-- threads and runs: b<nonce>-<thread>-<counter>. Usage: wrk ... -s post_tests.lua URL -- NONCE
-- where NONCE is 8 hex digits, new for every run. clinic_id is one of the pre-filled C0001..C1000.

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

local TEST_TYPES = {
   {"HbA1c", "%", 4.0, 12.0, 1},
   {"LDL", "mmol/L", 1.0, 6.0, 2},
   {"Glucose", "mmol/L", 3.5, 15.0, 1},
   {"TSH", "mIU/L", 0.1, 8.0, 2},
   {"Creatinine", "umol/L", 40.0, 160.0, 0},
   {"CRP", "mg/L", 0.1, 80.0, 1},
}
local NOTES = {"null", '"fasting sample"', '"repeat requested by GP"', "null", '"haemolysed, redrawn"', "null"}
local CLINICS = 1000

local nonce = "00000000"
local counter = 0
local headers = with_auth({["Content-Type"] = "application/json"})

function init(args)
   nonce = args[1] or nonce
   math.randomseed(tonumber(nonce, 16) + 7919 * (thread_no or 0))
end

function request()
   counter = counter + 1
   local t = TEST_TYPES[math.random(#TEST_TYPES)]
   local value = t[3] + math.random() * (t[4] - t[3])
   local body = string.format(
      '{"test_id": "b%s-%02d-%07d", "clinic_id": "C%04d", "patient_id": "P%06d", "test_type": "%s", '
      .. '"result": %.' .. t[5] .. 'f, "unit": "%s", "status": "final", '
      .. '"collected_at": "2024-%02d-%02dT%02d:%02d:%02d+02:00", "notes": %s}',
      nonce, thread_no or 0, counter, math.random(CLINICS), math.random(999999), t[1], value, t[2],
      math.random(12), math.random(28), math.random(0, 23), math.random(0, 59), math.random(0, 59),
      NOTES[math.random(#NOTES)])
   return wrk.format("POST", "/tests", headers, body)
end
