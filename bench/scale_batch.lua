-- POST /tests/_batch with NDJSON bodies of SIZE realistic records, for bench_scale.py.
-- Usage: wrk ... -s scale_batch.lua URL -- NONCE CLINICS MODE SIZE
--   MODE clinic: every record of a body is for one random clinic (a lab pushing its results);
--   MODE mixed: every record for a random clinic (the worst case for index locality).
-- test_ids are g<NONCE>-<thread>-<counter>, unique across threads and runs.

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")
dofile(dir .. "record.lua")

local nonce, clinics, mode, size = "00000000", 500, "clinic", 1000
local counter = 0
local headers = with_auth({["Content-Type"] = "application/x-ndjson"})

function init(args)
   nonce = args[1] or nonce
   seed_random(nonce)
   clinics = tonumber(args[2] or "500")
   mode = args[3] or mode
   size = tonumber(args[4] or "1000")
end

function request()
   local lines = {}
   local clinic = math.random(clinics)
   for i = 1, size do
      counter = counter + 1
      if mode == "mixed" then
         clinic = math.random(clinics)
      end
      lines[i] = record_json(string.format("g%s-%02d-%08d", nonce, thread_no or 0, counter),
                             string.format("C%04d", clinic), string.format("P%04d-%06d", clinic, math.random(0, 99)))
   end
   return wrk.format("POST", "/tests/_batch", headers, table.concat(lines, "\n") .. "\n")
end
