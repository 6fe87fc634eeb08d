-- record_json(test_id, clinic_id, patient_id): one realistic record as POST /tests takes it,
-- mirroring records_gen.make_record (same test types, units, value ranges, notes): keep the two in step.
-- Loaded with dofile by the scripts that post records.

local TEST_TYPES = {
   {"HbA1c", "%", 4.0, 12.0, 1},
   {"LDL", "mmol/L", 1.0, 6.0, 2},
   {"Glucose", "mmol/L", 3.5, 15.0, 1},
   {"TSH", "mIU/L", 0.1, 8.0, 2},
   {"Creatinine", "umol/L", 40.0, 160.0, 0},
   {"CRP", "mg/L", 0.1, 80.0, 1},
}
local NOTES = {"null", '"fasting sample"', '"repeat requested by GP"', "null", '"haemolysed, redrawn"', "null"}

function record_json(test_id, clinic_id, patient_id)
   local t = TEST_TYPES[math.random(#TEST_TYPES)]
   local value = t[3] + math.random() * (t[4] - t[3])
   return string.format(
      '{"test_id": "%s", "clinic_id": "%s", "patient_id": "%s", "test_type": "%s", '
      .. '"result": %.' .. t[5] .. 'f, "unit": "%s", "status": "final", '
      .. '"collected_at": "2024-%02d-%02dT%02d:%02d:%02d+02:00", "notes": %s}',
      test_id, clinic_id, patient_id, t[1], value, t[2],
      math.random(12), math.random(28), math.random(0, 23), math.random(0, 59), math.random(0, 59),
      NOTES[math.random(#NOTES)])
end
