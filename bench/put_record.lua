-- PUT /tests/seed-NNNNNNN: correct pre-filled records, each exactly once, at If-Match "1", so
-- every answer should be 200 (a 412 or 404 means the run went past its block of records).
-- Usage: wrk ... -s put_record.lua URL -- NONCE FIRST THREADS PATIENTS_FILE
--   FIRST: the 1-based number of this run's first record; THREADS: wrk's -t;
--   PATIENTS_FILE: line n is "clinic_id patient_id" of seed record n (identity fields must not change).

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

local first, threads, counter = 1, 1, 0
local identity = {}
local headers = with_auth({["Content-Type"] = "application/json", ["If-Match"] = '"1"'})

function init(args)
   first, threads = tonumber(args[2]), tonumber(args[3])
   for line in io.lines(args[4]) do
      identity[#identity + 1] = line
   end
   seed_random(args[1])
end

function request()
   local n = first + (thread_no or 0) + threads * counter
   counter = counter + 1
   local clinic, patient = identity[n]:match("^(%S+) (%S+)$")
   local body = string.format(
      '{"test_id": "seed-%07d", "clinic_id": "%s", "patient_id": "%s", "test_type": "HbA1c", '
      .. '"result": %.1f, "unit": "%%", "status": "corrected", "collected_at": "2024-05-01T10:00:00+02:00", '
      .. '"notes": "re-run"}', n, clinic, patient, 4 + math.random() * 8)
   return wrk.format("PUT", string.format("/tests/seed-%07d", n), headers, body)
end
