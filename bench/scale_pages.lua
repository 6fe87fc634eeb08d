-- GET /tests?clinic_id=<random clinic>&limit=100[&<filter>], for bench_scale.py.
-- Usage: wrk ... -s scale_pages.lua URL -- NONCE CLINICS FILTER VALUES
--   FILTER: none | patient_id | test_type | status | collected
--   VALUES: comma-separated, URL-encoded values to pick from (test types, statuses), or for
--   `collected` the month boundaries a random one-month range is taken from.
-- Clinics are C0001..C<CLINICS> as `seed` names them; patient n of clinic C0042 is P0042-<n>.

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

local clinics, filter, values = 500, "none", {}
local headers = with_auth({})

function init(args)
   seed_random(args[1])
   clinics = tonumber(args[2] or "500")
   filter = args[3] or "none"
   for value in string.gmatch(args[4] or "", "[^,]+") do
      table.insert(values, value)
   end
end

function request()
   local number = string.format("%04d", math.random(clinics))
   local path = "/tests?clinic_id=C" .. number .. "&limit=100"
   if filter == "patient_id" then
      -- Every seeded clinic has at least ~50 patients: 0..9 always exist.
      path = path .. string.format("&patient_id=P%s-%06d", number, math.random(0, 9))
   elseif filter == "collected" then
      local i = math.random(#values - 1)
      path = path .. "&collected_from=" .. values[i] .. "&collected_to=" .. values[i + 1]
   elseif filter ~= "none" then
      path = path .. "&" .. filter .. "=" .. values[math.random(#values)]
   end
   return wrk.format("GET", path, headers)
end
