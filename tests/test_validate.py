"""The record rules of API.md, one row per rule, checked on the pure validator."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from records_service.validate import (
    InvalidBatch, MalformedJSON, TooManyRecords, parse_batch, parse_json, parse_timestamp, timestamp_sort_key, validate_correction, validate_record,
)

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
VALID = {
    "test_id": "T-1", "clinic_id": "C001", "patient_id": "P.9:x_y-z", "test_type": "CBC",
    "result": 12.5, "collected_at": "2025-05-01T10:00:00Z",
}


def with_(**changes):
    doc = dict(VALID)
    for key, value in changes.items():
        if value is DROP:
            doc.pop(key)
        else:
            doc[key] = value
    return doc


DROP = object()

# (case name, document, the field that must be reported)
INVALID = [
    ("test_id missing", with_(test_id=DROP), "test_id"),
    ("test_id empty", with_(test_id=""), "test_id"),
    ("test_id too long", with_(test_id="a" * 65), "test_id"),
    ("test_id starts with _", with_(test_id="_batch"), "test_id"),
    ("test_id starts with -", with_(test_id="-x"), "test_id"),
    ("test_id has space", with_(test_id="a b"), "test_id"),
    ("test_id has slash", with_(test_id="a/b"), "test_id"),
    ("test_id non-ASCII letter", with_(test_id="é1"), "test_id"),
    ("test_id non-ASCII digit", with_(test_id="1٣"), "test_id"),
    ("test_id trailing newline", with_(test_id="abc\n"), "test_id"),
    ("test_id number", with_(test_id=12), "test_id"),
    ("test_id null", with_(test_id=None), "test_id"),
    ("clinic_id missing", with_(clinic_id=DROP), "clinic_id"),
    ("clinic_id bad char", with_(clinic_id="C#1"), "clinic_id"),
    ("clinic_id list", with_(clinic_id=["C1"]), "clinic_id"),
    ("patient_id missing", with_(patient_id=DROP), "patient_id"),
    ("patient_id too long", with_(patient_id="p" * 65), "patient_id"),
    ("test_type missing", with_(test_type=DROP), "test_type"),
    ("test_type only spaces", with_(test_type="   "), "test_type"),
    ("test_type too long after trim", with_(test_type=" " + "x" * 65 + " "), "test_type"),
    ("test_type control char", with_(test_type="Hb\x07A1c"), "test_type"),
    ("test_type DEL", with_(test_type="Hb\x7f"), "test_type"),
    ("test_type C1 control inside", with_(test_type="Hb\x85A1c"), "test_type"),
    ("test_type number", with_(test_type=5), "test_type"),
    ("result missing", with_(result=DROP), "result"),
    ("result true", with_(result=True), "result"),
    ("result false", with_(result=False), "result"),
    ("result null", with_(result=None), "result"),
    ("result empty string", with_(result=""), "result"),
    ("result string too long", with_(result="x" * 1025), "result"),
    ("result control char", with_(result="pos\x00"), "result"),
    ("result carriage return", with_(result="a\rb"), "result"),
    ("result object", with_(result={"v": 1}), "result"),
    ("result list", with_(result=[1]), "result"),
    ("result infinite float", with_(result=float("inf")), "result"),
    ("result lone surrogate", with_(result="\ud800"), "result"),
    ("unit too long", with_(unit="u" * 33), "unit"),
    ("unit control char", with_(unit="mg\tdL"), "unit"),
    ("unit number", with_(unit=5), "unit"),
    ("status unknown", with_(status="done"), "status"),
    ("status wrong case", with_(status="FINAL"), "status"),
    ("status entered-in-error is the service's", with_(status="entered-in-error"), "status"),
    ("status null", with_(status=None), "status"),
    ("collected_at missing", with_(collected_at=DROP), "collected_at"),
    ("collected_at no offset", with_(collected_at="2025-05-01T10:00:00"), "collected_at"),
    ("collected_at date only", with_(collected_at="2025-05-01"), "collected_at"),
    ("collected_at space separator", with_(collected_at="2025-05-01 10:00:00Z"), "collected_at"),
    ("collected_at impossible date", with_(collected_at="2025-02-30T10:00:00Z"), "collected_at"),
    ("collected_at hour 24", with_(collected_at="2025-05-01T24:00:00Z"), "collected_at"),
    ("collected_at leap second", with_(collected_at="2016-12-31T23:59:60Z"), "collected_at"),
    ("collected_at offset without colon", with_(collected_at="2025-05-01T10:00:00+0530"), "collected_at"),
    ("collected_at offset hour 24", with_(collected_at="2025-05-01T10:00:00+24:00"), "collected_at"),
    ("collected_at before 1900", with_(collected_at="1899-12-31T23:59:59Z"), "collected_at"),
    ("collected_at 6 minutes ahead", with_(collected_at="2025-06-01T12:06:00Z"), "collected_at"),
    ("collected_at 10 fraction digits", with_(collected_at="2025-05-01T10:00:00.1234567890Z"), "collected_at"),
    ("collected_at unicode digits", with_(collected_at="２025-05-01T10:00:00Z"), "collected_at"),
    ("collected_at trailing newline", with_(collected_at="2025-05-01T10:00:00Z\n"), "collected_at"),
    ("collected_at number", with_(collected_at=1714557600), "collected_at"),
    ("notes too long", with_(notes="n" * 2001), "notes"),
    ("notes number", with_(notes=3), "notes"),
    ("unknown field", with_(comment="hi"), "comment"),
    ("server field sent by client", with_(version=1), "version"),
]


@pytest.mark.parametrize("doc, field", [pytest.param(d, f, id=name) for name, d, f in INVALID])
def test_each_rule_rejects_and_names_the_field(doc, field):
    record, errors = validate_record(doc, NOW)
    assert record is None
    assert [e["field"] for e in errors] == [field], errors
    assert errors[0]["message"]


def test_every_failing_field_is_reported_at_once():
    doc = {"test_id": "", "clinic_id": 1, "test_type": " ", "result": True, "unit": "x" * 40,
           "status": "nope", "collected_at": "yesterday", "notes": 7, "extra": 1}
    record, errors = validate_record(doc, NOW)
    assert record is None
    assert sorted(e["field"] for e in errors) == sorted(
        ["test_id", "clinic_id", "patient_id", "test_type", "result", "unit", "status", "collected_at", "notes", "extra"])


@pytest.mark.parametrize("doc", [[], "x", 3, None, True, [VALID]])
def test_a_document_that_is_not_an_object_is_rejected(doc):
    record, errors = validate_record(doc, NOW)
    assert record is None and errors == [{"field": None, "message": "the record must be a JSON object"}]


def test_a_valid_record_is_completed_with_defaults_and_normalised():
    record, errors = validate_record(with_(test_type="  HbA1c \t", collected_at="2025-05-01T10:00:00.120+05:30"), NOW)
    assert errors == []
    assert record == {
        "test_id": "T-1", "clinic_id": "C001", "patient_id": "P.9:x_y-z", "test_type": "HbA1c", "result": 12.5,
        "unit": None, "status": "final", "collected_at": "2025-05-01T04:30:00.120Z", "notes": None,
    }
    assert list(record) == ["test_id", "clinic_id", "patient_id", "test_type", "result", "unit", "status",
                            "collected_at", "notes"]


@pytest.mark.parametrize("result", [0, -3, 10**30, 1.5e300, "positive", "line1\n\tline2", "x" * 1024])
def test_results_that_are_allowed(result):
    record, errors = validate_record(with_(result=result), NOW)
    assert errors == [] and record["result"] == result


@pytest.mark.parametrize("field, value", [
    ("test_id", "a" * 64), ("test_id", "0"), ("test_id", "A.b:c_d-e"), ("unit", None), ("unit", ""),
    ("unit", "u" * 32), ("notes", None), ("notes", "n" * 2000), ("notes", "line\nwith\x01control"),
    ("status", "preliminary"), ("status", "corrected"), ("status", "cancelled"), ("test_type", "t" * 64),
])
def test_boundary_values_that_are_allowed(field, value):
    record, errors = validate_record(with_(**{field: value}), NOW)
    assert errors == [] and record[field] == value


@pytest.mark.parametrize("given, stored", [
    ("2024-05-01T10:00:00+05:30", "2024-05-01T04:30:00Z"),
    ("2024-05-01T10:00:00Z", "2024-05-01T10:00:00Z"),
    ("2024-05-01t10:00:00z", "2024-05-01T10:00:00Z"),
    ("2024-05-01T10:00:00-00:00", "2024-05-01T10:00:00Z"),
    ("2024-12-31T23:30:00-01:00", "2025-01-01T00:30:00Z"),
    ("2024-05-01T10:00:00.5+01:00", "2024-05-01T09:00:00.5Z"),
    ("2024-05-01T10:00:00.123456789Z", "2024-05-01T10:00:00.123456789Z"),
    ("2024-02-29T00:00:00Z", "2024-02-29T00:00:00Z"),
    ("1900-01-01T00:00:00Z", "1900-01-01T00:00:00Z"),
    ("2025-06-01T12:05:00Z", "2025-06-01T12:05:00Z"),
])
def test_collected_at_is_normalised_to_utc_keeping_fractions(given, stored):
    assert parse_timestamp(given, NOW) == (stored, None)


def test_sort_keys_order_like_time():
    stamps = ["2024-05-01T04:30:00Z", "2024-05-01T04:30:00.05Z", "2024-05-01T04:30:00.5Z", "2024-05-01T04:30:01Z"]
    keys = [timestamp_sort_key(s) for s in stamps]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_duplicate_keys_are_reported_with_the_other_errors():
    doc = parse_json(b'{"test_id": "a", "test_id": "b", "clinic_id": "C1", "patient_id": "P", "test_type": "x",'
                     b' "result": true, "collected_at": "2025-05-01T10:00:00Z"}')
    record, errors = validate_record(doc, NOW)
    assert record is None
    assert errors == [{"field": "test_id", "message": "appears more than once in the object"},
                      {"field": "result", "message": "must be a number or a string, not a boolean"}]


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_literals_are_rejected_naming_the_field(literal):
    doc = parse_json(b'{"test_id": "a", "clinic_id": "C1", "patient_id": "P", "test_type": "x",'
                     b' "result": ' + literal + b', "collected_at": "2025-05-01T10:00:00Z"}')
    record, errors = validate_record(doc, NOW)
    assert record is None and [e["field"] for e in errors] == ["result"]


def test_a_number_too_large_for_a_float_is_rejected():
    assert [e["field"] for e in validate_record(parse_json(_with_result(b"1e400")), NOW)[1]] == ["result"]


def _with_result(literal: bytes) -> bytes:
    return (b'{"test_id": "a", "clinic_id": "C1", "patient_id": "P", "test_type": "x",'
            b' "result": ' + literal + b', "collected_at": "2025-05-01T10:00:00Z"}')


@pytest.mark.parametrize("literal", [
    b"1e-400", b"-1e-400", b"4.9e-325", b"0." + b"0" * 1_000_000 + b"1", b"0.0000000000000000000000000001e-300",
])
def test_a_non_zero_number_that_would_be_stored_as_zero_is_rejected_naming_result(literal):
    record, errors = validate_record(parse_json(_with_result(literal)), NOW)
    assert record is None and [e["field"] for e in errors] == ["result"]
    assert "stored as 0" in errors[0]["message"]


@pytest.mark.parametrize("literal, stored", [
    (b"0.0", 0.0), (b"-0.0", 0.0), (b"0e-400", 0.0), (b"0.000e5", 0.0), (b"1e-300", 1e-300), (b"5e-324", 5e-324),
])
def test_zero_and_the_smallest_floats_are_stored_as_sent(literal, stored):
    record, errors = validate_record(parse_json(_with_result(literal)), NOW)
    assert errors == [] and record["result"] == stored


@pytest.mark.parametrize("body", [
    b"", b"   ", b"{", b'{"a": 1,}', b"\xff\xfe", b"[" * 100_000, b"{" * 100_000, b"1" * 5000, b"{'a': 1}",
])
def test_malformed_json_raises_with_a_safe_message(body):
    with pytest.raises(MalformedJSON) as info:
        parse_json(body)
    assert len(str(info.value)) < 200


STORED = {**VALID, "unit": None, "status": "final", "notes": None, "version": 1}


@pytest.mark.parametrize("changes, fields", [
    ({"result": 13, "status": "corrected"}, []),
    ({"test_id": "T-2"}, ["test_id"]),
    ({"clinic_id": "C002", "patient_id": "P2"}, ["clinic_id", "patient_id"]),
    ({"clinic_id": "C 2"}, ["clinic_id"]),            # invalid: reported once, for what is wrong with it
    ({"test_id": DROP}, ["test_id"]),                 # missing: reported as required
    ({"patient_id": "P2", "result": None}, ["result", "patient_id"]),
])
def test_a_correction_must_keep_the_identity_fields(changes, fields):
    record, errors = validate_correction(with_(**changes), STORED, NOW)
    assert [e["field"] for e in errors] == fields
    assert (record is None) == bool(fields)


@pytest.mark.parametrize("body", [b"[]", b" [ ] ", b'[{"a": 1}]', b'\n[ {"a": [1, {"b": null}]} ,\t"x", 3, [] ]\r\n'])
def test_a_json_batch_is_parsed_item_by_item_as_json_loads_would(body):
    assert list(parse_batch(body, ndjson=False, max_records=10)) == json.loads(body)


@pytest.mark.parametrize("body, error", [
    (b"[{} {}]", MalformedJSON), (b"[{},]", MalformedJSON), (b"[{}] []", MalformedJSON), (b"[", MalformedJSON),
    (b"[{}", MalformedJSON), (b"", MalformedJSON), (b"{}", InvalidBatch), (b'"x"', InvalidBatch),
])
def test_a_json_batch_that_is_not_one_array_is_refused_whole(body, error):
    with pytest.raises(error):
        list(parse_batch(body, ndjson=False, max_records=10))


def test_ndjson_blank_lines_are_not_records_and_a_bad_line_fails_alone():
    items = list(parse_batch(b'\n  \r\n{"a": 1}\n\t\n{oops\n\f\n[]', ndjson=True, max_records=3))
    assert items[0] == {"a": 1} and isinstance(items[1], MalformedJSON) and items[2] == []


@pytest.mark.parametrize("ndjson, body", [
    (True, b"{}\n" * 3 + b"{oops"), (True, b"{}\n\n" * 4), (False, b"[" + b"{}," * 4 + b"{oops"),
])
def test_one_record_over_the_limit_is_too_many_before_anything_past_it_is_read(ndjson, body):
    """Eager: no record is yielded (none validated) before the count is known."""
    with pytest.raises(TooManyRecords):
        parse_batch(body, ndjson=ndjson, max_records=3)
