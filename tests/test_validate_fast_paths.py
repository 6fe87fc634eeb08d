"""The write path's fast paths agree with the full rules they short-cut.

Each fast path (a canonical timestamp, a record valid in the usual way, an NDJSON line that is
one JSON value, a stored document's JSON, a whole-second sort key) is checked against the
general code on generated inputs, valid and not: same accept/reject, same value, same problem.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from records_service.store import stored_doc
from records_service.validate import (
    MalformedJSON, NonFinite, Unrepresentable, _canonical_utc, _judged_field_by_field, _parse_instant, _parse_line,
    _plainly_valid, parse_json, timestamp_sort_key, validate_record,
)

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


def _two_digits(low: int, high: int):
    return st.integers(low, high).map(lambda n: f"{n:02d}")


# Timestamps near and across every edge the rules draw: years 0000-9999 (with 1900 and the
# clock close), impossible months, days, hours (24:00), minutes, leap seconds (:60), lower case
# `t`/`z`, a space, 0-10 fraction digits, offsets past ±23:59 or with minute 60, a missing colon.
timestamp_strings = st.builds(
    lambda year, month, day, t, hour, minute, second, fraction, zone: (
        f"{year}-{month}-{day}{t}{hour}:{minute}:{second}{fraction}{zone}"),
    st.one_of(st.integers(0, 9999).map(lambda n: f"{n:04d}"), st.sampled_from(["1899", "1900", "2025", "999"])),
    _two_digits(0, 13), _two_digits(0, 32), st.sampled_from(["T", "T", "T", "t", " "]),
    _two_digits(0, 25), _two_digits(0, 61), _two_digits(0, 61),
    st.one_of(st.just(""), st.text("0123456789", min_size=1, max_size=10).map(lambda d: "." + d)),
    st.one_of(
        st.sampled_from(["Z", "Z", "z", "", "+0530", "-00:00", "+00:00"]),
        st.builds(lambda sign, h, m: f"{sign}{h}:{m}", st.sampled_from("+-"), _two_digits(0, 25), _two_digits(0, 61)),
    ),
)

EDGE_TIMESTAMPS = [
    "2024-05-01T10:00:00Z", "2024-05-01T10:00:00+02:00", "2024-05-01T10:00:00.5-05:30",
    "2024-05-01T10:00:00.123456789Z",
    "2024-05-01t10:00:00z", "2024-05-01T24:00:00Z", "2016-12-31T23:59:60Z", "2024-02-30T10:00:00Z",
    "2024-05-01T10:00:00+05:60", "2024-05-01T10:00:00+24:00", "2024-05-01T10:00:00+23:59", "2024-05-01T10:00:00-23:59",
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0000-01-01T00:00:00Z", "0999-06-01T00:00:00Z",
    "2024-05-01T10:00:00.1234567890Z", "2024-05-01 10:00:00Z", "2024-05-01T10:00:00", "２024-05-01T10:00:00Z",
]


def _read_alike(value: str) -> None:
    fast = _canonical_utc(value)
    if fast is not None:
        _, normalised, problem = _parse_instant(value)
        assert (normalised, problem) == (fast, None)


@pytest.mark.parametrize("value", EDGE_TIMESTAMPS)
def test_an_edge_timestamp_reads_as_the_general_parser_reads_it(value):
    _read_alike(value)


@settings(max_examples=2000, deadline=None)
@given(timestamp_strings)
def test_a_generated_timestamp_reads_as_the_general_parser_reads_it(value):
    _read_alike(value)


def test_the_usual_timestamps_take_the_fast_path():
    """Not a dead branch: upper-case T and Z, whole or fractional seconds, any real offset."""
    for value in ["2024-05-01T10:00:00Z", "2024-05-01T23:30:00-05:30", "2024-12-31T23:59:59.999+23:59",
                  "1900-01-01T00:00:00.000000001Z"]:
        assert _canonical_utc(value) is not None, value


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
       st.integers(-23 * 60 - 59, 23 * 60 + 59), st.text("0123456789", max_size=9))
@settings(max_examples=500, deadline=None)
def test_every_real_instant_in_canonical_form_is_read_fast_and_normalised_to_the_same_utc(moment, offset, digits):
    sign = "+" if offset >= 0 else "-"
    fraction = f".{digits}" if digits else ""
    zone = "Z" if offset == 0 and not digits else f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
    value = moment.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0") + fraction + zone
    fast = _canonical_utc(value)
    assert fast is not None and _parse_instant(value)[1:] == (fast, None)


def test_whole_second_sort_keys_are_what_the_general_form_makes():
    for normalised in ["2024-05-01T10:00:00Z", "0999-01-01T00:00:00Z", "2024-05-01T10:00:00.5Z"]:
        base, _, rest = normalised.rstrip("Z").partition(".")
        assert timestamp_sort_key(normalised) == f"{base}.{rest.ljust(9, '0')}Z"


VALID = {"test_id": "T-1", "clinic_id": "C001", "patient_id": "P.9:x_y-z", "test_type": " HbA1c ", "result": 6.5,
         "unit": "%", "status": "final", "collected_at": "2025-05-01T10:00:00+02:00", "notes": "fasting"}
# Per field: values that pass and values that fail, in every type and at every limit.
FIELD_VALUES = {
    "test_id": ["T-1", "a" * 64, "a" * 65, "", "_x", "é1", "1٣", "abc\n", 12, None],
    "clinic_id": ["C001", "C#1", ["C1"]],
    "patient_id": ["P1", "p" * 65],
    "test_type": ["CBC", " x ", "   ", "x" * 64, " " + "x" * 65 + " ", "Hb\x07", "Hb\x7f", "Hb\x85", "Hämoglobin",
                  "\ud800", "x\ty", 5, None],
    "result": [12.5, 0, -3, 0.0, 10**30, float("inf"), float("nan"), True, False, None, "", "pos", "a\tb\nc", "a\rb",
               "x" * 1024, "x" * 1025, "positivé", "\ud800", "\x85", {"v": 1}, [1]],
    "unit": [None, "", "mg/dL", "u" * 32, "u" * 33, "mg\tdL", "µmol/L", "\x9f", 5],
    "status": ["preliminary", "final", "corrected", "cancelled", "entered-in-error", "FINAL", None, 1],
    "collected_at": ["2025-05-01T10:00:00Z", "2025-05-01T10:00:00.123-05:30", "1899-12-31T23:59:59Z",
                     "1900-01-01T00:00:00Z", "1900-01-01T00:59:59+01:00", "2025-06-01T12:05:00Z",
                     "2025-06-01T12:05:01Z", "2025-06-01T14:05:00.999+02:00", "2025-06-01T14:05:01+02:00",
                     "2025-05-01t10:00:00z", "2025-05-01T24:00:00Z", 1714557600, None],
    "notes": [None, "", "n" * 2000, "n" * 2001, "line\nbreak\x00", "naïve", "\udfff", 3],
}
_ABSENT = object()


@st.composite
def record_documents(draw):
    """A record with a few fields changed, dropped, unknown or given twice (often none, so that
    valid records, the fast path's business, are many)."""
    doc = dict(VALID)
    for name in draw(st.lists(st.sampled_from(list(FIELD_VALUES)), max_size=3, unique=True)):
        choice = draw(st.sampled_from([*FIELD_VALUES[name], _ABSENT]))
        if choice is _ABSENT:
            del doc[name]
        else:
            doc[name] = choice
    extra = draw(st.sampled_from(["", ', "comment": "hi"', ', "version": 1', ', "test_id": "T-2"',
                                  ', "notes": null', ', "result": 1e-400', ', "result": NaN']))
    ascii_only = draw(st.booleans()) or any("\ud800" <= c <= "\udfff" for c in map(str, doc.values()))
    text = json.dumps(doc, ensure_ascii=ascii_only)  # (UTF-8 carries a lone surrogate only as its escape)
    return parse_json((text[:-1] + extra + "}" if doc else "{" + extra.lstrip(", ") + "}").encode())


@settings(max_examples=1500, deadline=None)
@given(record_documents(), st.sampled_from([NOW, NOW + timedelta(microseconds=500_000)]))
def test_a_record_is_judged_the_same_with_or_without_the_fast_path(doc, now):
    expected = _judged_field_by_field(doc, now)
    assert validate_record(doc, now) == expected
    fast = _plainly_valid(doc, now)
    if fast is not None:
        assert expected == (fast, [])


@pytest.mark.parametrize("doc", [VALID, {**VALID, "result": 7, "unit": None, "notes": None},
                                 {**VALID, "result": "positive", "test_type": "Hämoglobin", "notes": "naïve"},
                                 {key: VALID[key] for key in ("test_id", "clinic_id", "patient_id", "test_type",
                                                              "result", "collected_at")}])
def test_the_usual_valid_records_take_the_fast_path(doc):
    """Not a dead branch: plain records, with or without the optional fields, non-ASCII text."""
    assert _plainly_valid(doc, NOW) is not None
    assert _plainly_valid(doc, NOW) == _judged_field_by_field(doc, NOW)[0]


@pytest.mark.parametrize("line", [
    b'{"a": 1}', b'{"a": 1} ', b'{"a": 1}\r', b' {"a": 1}', b'\t[1, 2]', b'"x"', b"12", b"1e-400", b"NaN",
    b'{"a": 1, "a": 2}', b'{"a": 1} x', b'{"a": 1}{}', b'{"a": ', b"\xff{}", b'{"a": "\xc3\xa9"}', b"\f{}",
    b"[" * 100_000, b"1" * 5000, b'{"a": -Infinity}', b"nul", b'{"a": 1}\t \r', b'{"a": 1}\f', b'{"a": 1}\v',
    b'{"a": 1}\x85', b'{"a": 1}\xc2\xa0', b'"\xe2\x80\xa8"',
])
def test_an_ndjson_line_parses_as_parse_json_parses_it(line):
    fast = _parse_line(line)
    try:
        expected = parse_json(line, "the line")
    except MalformedJSON as exc:
        assert isinstance(fast, MalformedJSON) and str(fast) == str(exc)
    else:
        assert _shape(fast) == _shape(expected)


def _shape(item):
    """A parsed item as comparable data: types, values, duplicate keys, the stand-ins' literals
    (NonFinite and Unrepresentable compare by identity)."""
    if isinstance(item, dict):
        return type(item), [(key, _shape(value)) for key, value in item.items()], getattr(item, "duplicate_keys", ())
    if isinstance(item, list):
        return [_shape(value) for value in item]
    if isinstance(item, (NonFinite, Unrepresentable)):
        return type(item), getattr(item, "literal", None)
    return type(item), item


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["test_id", "result", "notes", "created_at", "version", "x\u00e9"]) | st.text(),
                       json_scalars, max_size=9),
       st.text(max_size=30), st.integers(1, 9), st.text(max_size=40))
def test_a_stored_document_is_what_json_dumps_makes_of_it(record, now, version, request_id):
    expected = json.dumps({**record, "created_at": now, "updated_at": now, "version": version,
                           "request_id": request_id}, ensure_ascii=False)
    assert stored_doc(record, created_at=now, updated_at=now, version=version, request_id=request_id) == expected
