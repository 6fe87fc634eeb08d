"""From upstream items to records (records_service.imports.mapping)."""

from datetime import datetime, timezone

import pytest

from records_service.imports.mapping import item_mapper, larger, record_of
from records_service.imports.source import parse_source

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


def mapper(fields: dict | None = None, values: dict | None = None):
    base = {"test_id": "id", "clinic_id": {"value": "C001"}, "patient_id": "patient.mrn", "test_type": "code",
            "result": "value", "collected_at": "at", "status": "state"}
    return item_mapper(parse_source({"name": "s", "kind": "rest", "url": "http://u.example/", "fields":
                                     {**base, **(fields or {})}, "values": values or {}}, {}))


ITEM = {"id": "T-1", "patient": {"mrn": "P-1"}, "code": "HbA1c", "value": 5.4, "at": "2025-05-01T10:00:00+05:30",
        "state": "F"}


def test_paths_fixed_values_and_value_maps_make_a_record():
    record, test_id, problem = record_of(ITEM, mapper(values={"status": {"F": "final"}}), NOW)
    assert problem is None and test_id == "T-1"
    assert record == {"test_id": "T-1", "clinic_id": "C001", "patient_id": "P-1", "test_type": "HbA1c", "result": 5.4,
                      "unit": None, "status": "final", "collected_at": "2025-05-01T04:30:00Z", "notes": None}


def test_a_value_with_no_entry_in_its_map_passes_through():
    _, _, problem = record_of({**ITEM, "state": "X"}, mapper(values={"status": {"F": "final"}}), NOW)
    assert problem == "status must be one of preliminary, final, corrected, cancelled"


def test_numbers_and_booleans_are_looked_up_by_their_json_text():
    to_status = {"status": {"1": "final", "true": "preliminary"}}
    assert mapper(values=to_status)({**ITEM, "state": 1})["status"] == "final"
    assert mapper(values=to_status)({**ITEM, "state": True})["status"] == "preliminary"


def test_a_fixed_value_goes_through_its_map_too():
    assert mapper({"unit": {"value": "pct"}}, {"unit": {"pct": "%"}})(ITEM)["unit"] == "%"


def test_a_path_that_finds_nothing_leaves_the_field_out_so_the_rules_name_it():
    record, test_id, problem = record_of({**ITEM, "patient": {}, "code": None, "state": "final"}, mapper(), NOW)
    assert record is None and test_id == "T-1"
    assert problem == "patient_id is required; test_type is required"


def test_every_failing_field_is_reported_and_a_bad_test_id_is_not_echoed():
    record, test_id, problem = record_of({**ITEM, "id": "bad id!", "value": True}, mapper(), NOW)
    assert record is None and test_id is None
    assert problem.startswith("test_id must match") and "result must be a number or a string, not a boolean" in problem


@pytest.mark.parametrize("item", [None, [1, 2], "T-1", 5])
def test_an_item_that_is_not_an_object_fails(item):
    assert record_of(item, mapper(), NOW) == (None, None, "the item is not a JSON object")


@pytest.mark.parametrize("a, b, expected", [
    (None, "2025-01-02", "2025-01-02"),
    ("2025-01-02", None, "2025-01-02"),
    ("2025-01-02T00:00:00Z", "2025-01-10T00:00:00Z", "2025-01-10T00:00:00Z"),
    (9, 10, 10),
    (2.5, 2, 2.5),
])
def test_the_watermark_keeps_the_larger_value(a, b, expected):
    assert larger(a, b) == expected
