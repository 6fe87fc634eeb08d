"""Strict JSON parsing and record validation: pure functions, no HTTP, no database.

`parse_json` turns bytes into Python values without the lenient defaults of `json.loads`
(NaN/Infinity, last-duplicate-key-wins). `validate_record` takes the parsed document and
returns a clean, normalised record or the list of every failing field.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from itertools import islice
from typing import Any, Iterator

ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:-]*$"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*", re.ASCII)
# Unicode category Cc: C0 controls, DEL and C1 controls.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_EXCEPT_TAB_NL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
_RFC3339_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))",
    re.ASCII,
)
# The forms nearly every client sends (`T` and `Z` in upper case, an offset that exists), which
# `datetime.fromisoformat` reads in one C call; anything else goes through _RFC3339_RE.
_CANONICAL_INSTANT_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])",
    re.ASCII,
)

CLIENT_STATUSES = ("preliminary", "final", "corrected", "cancelled")
VOIDED_STATUS = "entered-in-error"  # set by the service when a record is voided; no client may send it
CLIENT_FIELDS = (
    "test_id", "clinic_id", "patient_id", "test_type", "result",
    "unit", "status", "collected_at", "notes",
)
IMMUTABLE_FIELDS = ("test_id", "clinic_id", "patient_id")
REQUIRED_FIELDS = ("test_id", "clinic_id", "patient_id", "test_type", "result", "collected_at")
OPTIONAL_DEFAULTS = {"unit": None, "status": "final", "notes": None}

MAX_ID_CHARS = 64
MAX_TEST_TYPE_CHARS = 64
MAX_RESULT_CHARS = 1024
MAX_UNIT_CHARS = 32
MAX_NOTES_CHARS = 2000
MAX_FUTURE = timedelta(minutes=5)
EARLIEST_COLLECTED = datetime(1900, 1, 1, tzinfo=timezone.utc)

FieldError = dict  # {"field": str | None, "message": str}


class MalformedJSON(ValueError):
    """The body is not parseable JSON; the message says where, never echoes the body."""


class NonFinite:
    """Stands in for NaN/Infinity so the validator can name the field that carried it."""

    def __init__(self, literal: str) -> None:
        self.literal = literal

    def __repr__(self) -> str:
        return self.literal


class Unrepresentable:
    """Stands in for a number that would not be stored as sent: a non-zero literal that a float
    rounds to 0 (`1e-400`, `0.000…1` with a million zeros). Never echoes the literal."""


_EXPONENT_RE = re.compile(r"[eE]")
_NON_ZERO_DIGIT_RE = re.compile(r"[1-9]")


def _parse_float(literal: str) -> float | Unrepresentable:
    value = float(literal)
    if value == 0.0 and _NON_ZERO_DIGIT_RE.search(_EXPONENT_RE.split(literal, 1)[0]):
        return Unrepresentable()
    return value


class JSONObject(dict):
    """A parsed object that remembers keys it saw more than once (json keeps only the last)."""

    duplicate_keys: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict:
    obj = JSONObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicate_keys = tuple(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


_decoder = json.JSONDecoder(object_pairs_hook=_object_pairs, parse_constant=NonFinite, parse_float=_parse_float)


def _text(body: bytes, what: str) -> str:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJSON(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise MalformedJSON(f"{what} is empty; expected a JSON document")
    return text


def _malformed(exc: ValueError | RecursionError, what: str) -> MalformedJSON:
    """The client-safe MalformedJSON for what the decoder raised."""
    if isinstance(exc, json.JSONDecodeError):
        return MalformedJSON(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    if isinstance(exc, RecursionError):
        return MalformedJSON(f"{what} is not acceptable JSON: nested too deeply")
    # int() refuses numbers with thousands of digits (CPython's int_max_str_digits).
    return MalformedJSON(f"{what} is not acceptable JSON: a number has too many digits")


def parse_json(body: bytes, what: str = "the body") -> Any:
    """Decode UTF-8 JSON strictly; raise MalformedJSON with a client-safe message about `what`."""
    text = _text(body, what)
    try:
        return _decoder.decode(text)
    except (ValueError, RecursionError) as exc:
        raise _malformed(exc, what) from None


class InvalidBatch(ValueError):
    """A batch body that parses but is not an array of records."""


class TooManyRecords(ValueError):
    """A batch with more records than the limit; raised before any record past it is parsed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the batch has more than {limit} records, the limit; nothing was stored")


# A line that is not blank (bytes.strip()'s whitespace), up to its newline, found without
# splitting the body: a 16 MiB body of short lines split at once is millions of objects.
_RECORD_LINE_RE = re.compile(rb"^[ \t\r\f\v]*[^ \t\r\f\v\n][^\n]*", re.MULTILINE)
_JSON_SPACE_RE = re.compile(r"[ \t\n\r]*")


def parse_batch(body: bytes, ndjson: bool, max_records: int) -> Iterator[Any]:
    """The items of a batch body, in order, parsed one at a time as they are consumed, so a
    batch never holds more than one parsed item the caller has not kept.

    The items are counted first (TooManyRecords past `max_records`, without going further).
    NDJSON: one item per non-blank line; a line that does not parse is yielded as its
    MalformedJSON, so it fails that record and not the batch.
    JSON: the items of the array; a body that does not parse raises MalformedJSON, one that is
    not an array InvalidBatch.
    """
    if not ndjson:
        text = _text(body, "the body")
        for count, _ in enumerate(_array_items(text, _counting_decoder), start=1):
            if count > max_records:
                raise TooManyRecords(max_records)
        return _array_items(text, _decoder)
    spans = [line.span() for line in islice(_RECORD_LINE_RE.finditer(body), max_records + 1)]
    if len(spans) > max_records:
        raise TooManyRecords(max_records)
    return _lines(body, spans)


def _lines(body: bytes, spans: list[tuple[int, int]]) -> Iterator[Any]:
    for start, end in spans:
        yield _parse_line(body[start:end])


_scan_value = _decoder.scan_once


def _parse_line(line: bytes) -> Any:
    """An NDJSON line's item, or its MalformedJSON: what `parse_json` makes of it.

    The usual line, one JSON value from its first byte (then at most JSON whitespace, as a CRLF
    line ends), is decoded by one call of the C scanner (the same decoder, so the same item);
    any other line is left to `parse_json`, which says what is wrong with it.
    """
    try:
        text = line.decode("utf-8")
        item, end = _scan_value(text, 0)
    except (StopIteration, ValueError, RecursionError):  # not valid here (or leading space): parse_json judges
        pass
    else:
        if end == len(text) or not text[end:].strip(" \t\n\r"):
            return item
    try:
        return parse_json(line, "the line")
    except MalformedJSON as exc:
        return exc


# Only finds where the items of an array end: C-speed plain dicts, nothing kept.
_counting_decoder = json.JSONDecoder()


def _array_items(text: str, decoder: json.JSONDecoder) -> Iterator[Any]:
    """The items of the JSON array `text`, decoded one by one."""
    pos = _JSON_SPACE_RE.match(text).end()
    if not text.startswith("[", pos):
        raise InvalidBatch("a JSON batch must be an array of records")
    pos = _JSON_SPACE_RE.match(text, pos + 1).end()
    closed = text.startswith("]", pos)
    while not closed:
        try:
            item, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as exc:
            raise _malformed(exc, "the body") from None
        yield item
        pos = _JSON_SPACE_RE.match(text, pos).end()
        closed = text.startswith("]", pos)
        if not closed:
            if not text.startswith(",", pos):
                raise _malformed(json.JSONDecodeError("Expecting ',' delimiter", text, pos), "the body")
            pos = _JSON_SPACE_RE.match(text, pos + 1).end()
    pos = _JSON_SPACE_RE.match(text, pos + 1).end()
    if pos != len(text):
        raise _malformed(json.JSONDecodeError("Extra data", text, pos), "the body")


def _error(field: str | None, message: str) -> FieldError:
    return {"field": field, "message": message}


def _check_string(value: Any, *, min_len: int, max_len: int, control: re.Pattern | None) -> str | None:
    """Return what is wrong with a string value, or None when it is fine."""
    if not isinstance(value, str):
        return "must be a string"
    if len(value) < min_len:
        return "must not be empty"
    if len(value) > max_len:
        return f"must be at most {max_len} characters (got {len(value)})"
    if not value.isascii() and _SURROGATE_RE.search(value):  # isascii() is cheap and rules them out
        return "must be valid Unicode (no lone surrogates)"
    if control is not None and control.search(value):
        return "must not contain control characters"
    return None


def check_id(value: Any) -> str | None:
    """What is wrong with an id (test_id, clinic_id, patient_id), or None."""
    if not isinstance(value, str):
        return "must be a string"
    if not 1 <= len(value) <= MAX_ID_CHARS:
        return f"must be 1 to {MAX_ID_CHARS} characters (got {len(value)})"
    if not _ID_RE.fullmatch(value):
        return f"must match {ID_PATTERN}"
    return None


def check_test_type(value: Any) -> tuple[str | None, str | None]:
    """(trimmed test_type, None) or (None, what is wrong with it)."""
    trimmed = value.strip() if isinstance(value, str) else value
    problem = _check_string(trimmed, min_len=1, max_len=MAX_TEST_TYPE_CHARS, control=_CONTROL_RE)
    if problem:
        return None, problem + (" after trimming" if problem == "must not be empty" else "")
    return trimmed, None


def _check_result(value: Any) -> str | None:
    # bool is a subclass of int in Python: test it first or `true` would pass as 1.
    if isinstance(value, bool):
        return "must be a number or a string, not a boolean"
    if isinstance(value, NonFinite):
        return f"must be a finite number ({value.literal} is not allowed)"
    if isinstance(value, Unrepresentable):
        return "must be a number that can be stored as sent: this one is not zero but is too small, it would be stored as 0"
    if isinstance(value, int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "must be a finite number (out of range)"
    if isinstance(value, str):
        return _check_string(value, min_len=1, max_len=MAX_RESULT_CHARS, control=_CONTROL_EXCEPT_TAB_NL_RE)
    return "must be a number or a string"


def _check_optional_string(value: Any, max_len: int, control: re.Pattern | None) -> str | None:
    if value is None:
        return None
    return _check_string(value, min_len=0, max_len=max_len, control=control)


def parse_timestamp(value: Any, now: datetime) -> tuple[str | None, str | None]:
    """Parse a record's RFC 3339 date-time with offset; return (normalised UTC string, None) or (None, problem).

    Beyond the syntax, a record's time must be from 1900 on and not more than 5 minutes ahead.
    """
    utc, normalised, problem = _parse_instant(value)
    if problem:
        return None, problem
    if utc < EARLIEST_COLLECTED:
        return None, "must not be before 1900-01-01T00:00:00Z"
    if utc > now + MAX_FUTURE:
        return None, "must not be more than 5 minutes in the future"
    return normalised, None


@lru_cache(maxsize=None)  # at most 2 * 24 * 60 offsets exist
def _zone(sign: str, hours: str, minutes: str) -> timezone:
    return timezone(timedelta(hours=int(hours), minutes=int(minutes)) * (1 if sign == "+" else -1))


def _parse_instant(value: Any) -> tuple[datetime | None, str | None, str | None]:
    """(UTC datetime, normalised UTC string, None) for an RFC 3339 date-time with offset, else (None, None, problem).

    Fractional seconds are kept digit for digit: offsets are whole minutes, so moving to UTC
    never touches them.
    """
    if not isinstance(value, str):
        return None, None, "must be a string"
    match = _RFC3339_RE.fullmatch(value)
    if not match:
        return None, None, ("must be an RFC 3339 date-time with an offset, e.g. 2024-05-01T10:00:00Z"
                            " or 2024-05-01T10:00:00+05:30")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    if zulu:
        zone = timezone.utc
    else:
        if int(off_h) > 23 or int(off_m) > 59:
            return None, None, "has an impossible offset"
        zone = _zone(sign, off_h, off_m)
    try:
        local = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=zone)
        utc = local if zulu else local.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return None, None, "is not a real date and time"
    # isoformat, unlike strftime's %Y, pads years before 1000 (a filter may name one) and is faster.
    normalised = utc.isoformat()[:19] + (f".{fraction}" if fraction else "") + "Z"
    return utc, normalised, None


def _canonical_utc(value: str) -> str | None:
    """The normalised UTC form of a timestamp written in a canonical form, or None when
    `_parse_instant` must decide (another form, or not a real date and time).

    What it reads, `_parse_instant` reads the same: the regex admits only offsets that exist
    (fromisoformat would take +05:60 for +06:00), and fromisoformat refuses `24:00` and second
    60 as `datetime()` does.
    """
    if not _CANONICAL_INSTANT_RE.fullmatch(value):
        return None
    try:
        local = datetime.fromisoformat(value[:19])
        if value[-1] == "Z":
            return value  # upper case, fraction as sent: already normalised
        utc = local - _utc_offset(value[-6:])
    except (ValueError, OverflowError):
        return None
    return utc.isoformat() + value[19:-6] + "Z"


@lru_cache(maxsize=None)  # at most 2 * 24 * 60 offsets exist
def _utc_offset(offset: str) -> timedelta:
    """How far ahead of UTC a valid `+HH:MM` / `-HH:MM` is."""
    return timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])) * (1 if offset[0] == "+" else -1)


@lru_cache(maxsize=8)  # one clock reading per request
def _latest_collected(now: datetime) -> str:
    """The latest collected_at allowed at `now`, as the first 19 characters of a normalised
    timestamp; a whole-second time is at most `now + MAX_FUTURE` exactly when its text is at
    most this (seconds' fractions do not count in the rule)."""
    return (now + MAX_FUTURE).astimezone(timezone.utc).isoformat()[:19]


def utc_millis(moment: datetime) -> str:
    """An aware UTC datetime as the service writes its own times: RFC 3339, milliseconds, `Z`."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def timestamp_sort_key(normalised: str) -> str:
    """A fixed-width form of a normalised UTC timestamp, so text order is time order."""
    if len(normalised) == 20:  # whole seconds, the usual case: YYYY-MM-DDTHH:MM:SSZ
        return normalised[:19] + ".000000000Z"
    base, _, rest = normalised.rstrip("Z").partition(".")
    return f"{base}.{rest.ljust(9, '0')}Z"


def timestamp_from_sort_key(key: str) -> str:
    """The normalised UTC form of a sort key, fractional seconds without trailing zeros."""
    base, _, fraction = key.rstrip("Z").partition(".")
    fraction = fraction.rstrip("0")
    return f"{base}.{fraction}Z" if fraction else f"{base}Z"


def _check_unit(value: Any) -> str | None:
    return _check_optional_string(value, MAX_UNIT_CHARS, _CONTROL_RE)


def _check_notes(value: Any) -> str | None:
    return _check_optional_string(value, MAX_NOTES_CHARS, None)


def _check_status(value: Any) -> str | None:
    return None if value in CLIENT_STATUSES else f"must be one of {', '.join(CLIENT_STATUSES)}"


# Built once: validate_record runs for every record of a 10,000-record batch.
_FIELD_CHECKS = {
    "test_id": check_id,
    "clinic_id": check_id,
    "patient_id": check_id,
    "result": _check_result,
    "unit": _check_unit,
    "notes": _check_notes,
    "status": _check_status,
}
_CLIENT_FIELD_SET = frozenset(CLIENT_FIELDS)


def validate_record(doc: Any, now: datetime) -> tuple[dict | None, list[FieldError]]:
    """Check a parsed document against the record rules.

    Returns (record, []) with every client field present and normalised, or (None, errors)
    with one error per failing field, all of them at once.
    """
    record = _plainly_valid(doc, now)
    if record is not None:
        return record, []
    return _judged_field_by_field(doc, now)


_REQUIRED_FIELD_SET = frozenset(REQUIRED_FIELDS)
# test_id, clinic_id and patient_id on three lines (no id holds a newline), each matching
# ID_PATTERN within MAX_ID_CHARS: one regex call instead of three.
_ONE_ID = rf"[A-Za-z0-9][A-Za-z0-9._:-]{{0,{MAX_ID_CHARS - 1}}}"
_THREE_IDS_RE = re.compile(rf"{_ONE_ID}\n{_ONE_ID}\n{_ONE_ID}", re.ASCII)
_EARLIEST_COLLECTED_TEXT = EARLIEST_COLLECTED.isoformat()[:19]


def _plainly_valid(doc: Any, now: datetime) -> dict | None:
    """The clean record of a document that passes every rule in the usual way (known fields,
    text within its limits, a canonical timestamp), or None: then `_judged_field_by_field`
    decides and names what fails. One pass, no error bookkeeping: most records of a batch are
    valid.

    Whatever it accepts, the full judgement accepts with the same record (tests/
    test_validate_fast_paths.py compares the two over generated documents); a valid record it
    does not recognise is only slower, never refused.
    """
    if type(doc) is not JSONObject and type(doc) is not dict:
        return None
    if getattr(doc, "duplicate_keys", ()) or not _REQUIRED_FIELD_SET <= doc.keys() <= _CLIENT_FIELD_SET:
        return None
    test_id, clinic_id, patient_id = doc["test_id"], doc["clinic_id"], doc["patient_id"]
    if not (type(test_id) is str and type(clinic_id) is str and type(patient_id) is str
            and _THREE_IDS_RE.fullmatch(f"{test_id}\n{clinic_id}\n{patient_id}")):
        return None
    test_type = doc["test_type"]
    if type(test_type) is not str:
        return None
    test_type = test_type.strip()
    if not (0 < len(test_type) <= MAX_TEST_TYPE_CHARS and _clean_text(test_type, _CONTROL_RE)):
        return None
    result = doc["result"]
    kind = type(result)
    if kind is float:
        if not math.isfinite(result):
            return None
    elif kind is str:
        if not (0 < len(result) <= MAX_RESULT_CHARS and _clean_text(result, _CONTROL_EXCEPT_TAB_NL_RE)):
            return None
    elif kind is not int:  # bool, NonFinite, Unrepresentable, anything else: judged in full
        return None
    unit = doc.get("unit")
    if unit is not None and not (type(unit) is str and len(unit) <= MAX_UNIT_CHARS and _clean_text(unit, _CONTROL_RE)):
        return None
    status = doc.get("status", "final")
    if status not in CLIENT_STATUSES:
        return None
    notes = doc.get("notes")
    if notes is not None and not (type(notes) is str and len(notes) <= MAX_NOTES_CHARS
                                  and (notes.isascii() or not _SURROGATE_RE.search(notes))):
        return None
    collected_at = doc["collected_at"]
    collected_at = _canonical_utc(collected_at) if type(collected_at) is str else None
    if collected_at is None or not _EARLIEST_COLLECTED_TEXT <= collected_at[:19] <= _latest_collected(now):
        return None
    return {"test_id": test_id, "clinic_id": clinic_id, "patient_id": patient_id, "test_type": test_type,
            "result": result, "unit": unit, "status": status, "collected_at": collected_at, "notes": notes}


def _clean_text(value: str, control: re.Pattern) -> bool:
    """Whether a string has none of the characters _check_string refuses (lone surrogates and
    `control`), found without a regex for printable ASCII, the usual text."""
    if value.isascii():
        return value.isprintable() or not control.search(value)
    return not _SURROGATE_RE.search(value) and not control.search(value)


def _judged_field_by_field(doc: Any, now: datetime) -> tuple[dict | None, list[FieldError]]:
    """validate_record's full judgement: every rule, every failing field named."""
    if not isinstance(doc, dict):
        return None, [_error(None, "the record must be a JSON object")]

    errors: list[FieldError] = []
    duplicates = frozenset(getattr(doc, "duplicate_keys", ()))
    for key in sorted(duplicates):
        errors.append(_error(key, "appears more than once in the object"))
    for key in doc:
        if key not in _CLIENT_FIELD_SET:
            errors.append(_error(key, "is not a known field"))
    for key in REQUIRED_FIELDS:
        if key not in doc and key not in duplicates:
            errors.append(_error(key, "is required"))

    record = {name: doc.get(name, default) for name, default in OPTIONAL_DEFAULTS.items()}
    for name, check in _FIELD_CHECKS.items():
        if name in doc and name not in duplicates:
            problem = check(doc[name])
            if problem:
                errors.append(_error(name, problem))
            else:
                record[name] = doc[name]

    if "test_type" in doc and "test_type" not in duplicates:
        trimmed, problem = check_test_type(doc["test_type"])
        if problem:
            errors.append(_error("test_type", problem))
        else:
            record["test_type"] = trimmed

    if "collected_at" in doc and "collected_at" not in duplicates:
        normalised, problem = parse_timestamp(doc["collected_at"], now)
        if problem:
            errors.append(_error("collected_at", problem))
        else:
            record["collected_at"] = normalised

    if errors:
        return None, errors
    return {name: record[name] for name in CLIENT_FIELDS}, []


def client_fields(stored: dict) -> dict:
    """The client-supplied part of a stored record, for comparing a retry with what is stored."""
    return {name: stored[name] for name in CLIENT_FIELDS}


def validate_correction(doc: Any, stored: dict, now: datetime) -> tuple[dict | None, list[FieldError]]:
    """Check a correction: a full record (as `validate_record`) whose identity fields equal `stored`'s.

    Every failing field is reported at once; an identity field that is itself invalid is
    reported once, for what is wrong with it.
    """
    record, errors = validate_record(doc, now)
    failing = {e["field"] for e in errors}
    if isinstance(doc, dict):
        errors += [_error(name, "cannot be changed: it must equal the stored value")
                   for name in IMMUTABLE_FIELDS
                   if name in doc and name not in failing and doc[name] != stored[name]]
    if errors:
        return None, errors
    return record, []


# -- collection queries: GET /tests, /tests/_export -------------------------------------------

FILTER_STATUSES = (*CLIENT_STATUSES, "entered-in-error")  # a voided record can be listed, never sent
FILTERS = ("patient_id", "test_type", "status", "collected_from", "collected_to")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_DIGITS_RE = re.compile(r"[0-9]{1,7}", re.ASCII)
# What `+05:30` becomes when a client leaves the + unencoded in a query string.
_UNENCODED_PLUS_RE = re.compile(r"[0-9] [0-9]{2}(:?[0-9]{2})?$", re.ASCII)


def _check_filter(name: str, value: str) -> tuple[str | None, str | None]:
    """(clean value, None) or (None, problem) for one query filter, following the record's rules.

    Times may lie anywhere (a range reaching into the future is a fair question); they come back
    normalised to UTC, the form the links and cursors carry.
    """
    if name in ("clinic_id", "patient_id"):
        problem = check_id(value)
        return (None, problem) if problem else (value, None)
    if name == "test_type":
        return check_test_type(value)
    if name == "status":
        return (value, None) if value in FILTER_STATUSES else (None, f"must be one of {', '.join(FILTER_STATUSES)}")
    _, normalised, problem = _parse_instant(value)
    if problem:
        problem += f" (got {value[:64]!r}{'...' if len(value) > 64 else ''})"
        if _UNENCODED_PLUS_RE.search(value):
            problem += "; a + left unencoded in a URL arrives as a space: write the offset's + as %2B"
    return normalised, problem


def validate_filters(params: dict[str, str]) -> tuple[dict[str, str], list[FieldError]]:
    """clinic_id and the optional filters of a collection query (single string values).

    Returns ({"clinic_id": ..., <filter>: clean value, ...}, []) or ({}, every failing parameter).
    """
    filters: dict[str, str] = {}
    errors: list[FieldError] = []
    for name in ("clinic_id", *FILTERS):
        if name not in params:
            continue
        value, problem = _check_filter(name, params[name])
        if problem:
            errors.append(_error(name, problem))
        else:
            filters[name] = value
    return ({}, errors) if errors else (filters, [])


def validate_limit(raw: str | None) -> tuple[int | None, str | None]:
    """The page size: absent means DEFAULT_LIMIT; otherwise a whole number from 1 to MAX_LIMIT."""
    if raw is None:
        return DEFAULT_LIMIT, None
    if not _DIGITS_RE.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        return None, f"must be a whole number from 1 to {MAX_LIMIT}"
    return int(raw), None


def validate_list_query(params: dict[str, str]) -> tuple[dict | None, list[FieldError]]:
    """A GET /tests query: ({"filters": {...}, "limit": n}, []) or (None, every failing parameter).

    The cursor is checked elsewhere: only the store knows the key that signs it.
    """
    filters, errors = validate_filters(params)
    limit, problem = validate_limit(params.get("limit"))
    if problem:
        errors.append(_error("limit", problem))
    return (None, errors) if errors else ({"filters": filters, "limit": limit}, [])
