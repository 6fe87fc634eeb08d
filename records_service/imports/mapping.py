"""From an upstream item to a record: the source's paths, fixed values and value maps, then the
rules of a POST (`validate.validate_record`). Pure functions."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from ..validate import check_id, validate_record
from .paths import resolve
from .source import Fixed, Source


def _map_key(value: Any) -> str:
    """The key a value map looks an upstream value up by: a string as it is, anything else as
    its JSON text (so `1 = "final"` or `true = ...` in TOML can match a number or a boolean)."""
    return value if isinstance(value, str) else json.dumps(value)


def map_item(item: Any, source: Source) -> dict:
    """The client fields the source's [fields] make of `item`. A path that finds nothing leaves
    its field out, so the record's rules say "is required" or apply the field's default."""
    doc = {}
    for name, spec in source.fields.items():
        value = spec.value if isinstance(spec, Fixed) else resolve(item, spec)
        mapping = source.values.get(name)
        if mapping is not None and value is not None:
            value = mapping.get(_map_key(value), value)
        if value is not None:
            doc[name] = value
    return doc


def record_of(item: Any, source: Source, now: datetime) -> tuple[dict | None, str | None, str | None]:
    """(record, test_id, None) for an item that makes a valid record, else (None, test_id or None,
    what is wrong: every failing field, as one line)."""
    if not isinstance(item, dict):
        return None, None, "the item is not a JSON object"
    doc = map_item(item, source)
    test_id = doc.get("test_id")
    test_id = test_id if check_id(test_id) is None else None
    record, errors = validate_record(doc, now)
    if errors:
        return None, test_id, "; ".join(f"{e['field']} {e['message']}" for e in errors)
    return record, test_id, None


def larger(a: Any, b: Any) -> Any:
    """The larger of two watermark values (None is smallest): numbers by value, anything else by
    its text, so ISO timestamps in one format and zero-padded counters order as they should."""
    if a is None:
        return b
    if b is None:
        return a
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return max(a, b)
    return a if str(a) >= str(b) else b
