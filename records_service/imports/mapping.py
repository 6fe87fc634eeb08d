"""From an upstream item to a record: the source's paths, fixed values and value maps, then the
rules of a POST (`validate.validate_record`). Pure functions; `item_mapper` prepares a source's
fields once per run, since an import maps every field of every item."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Callable

from ..validate import check_id, validate_record
from .paths import getter
from .source import Fixed, Source


def _map_key(value: Any) -> str:
    """The key a value map looks an upstream value up by: a string as it is, anything else as
    its JSON text (so `1 = "final"` or `true = ...` in TOML can match a number or a boolean)."""
    return value if isinstance(value, str) else json.dumps(value)


def item_mapper(source: Source) -> Callable[[Any], dict]:
    """A function from an item to the client fields the source's [fields] make of it. A path
    that finds nothing leaves its field out, so the record's rules say "is required" or apply
    the field's default."""
    fixed = {name: spec.value for name, spec in source.fields.items() if isinstance(spec, Fixed)}
    found = [(name, getter(spec), source.values.get(name)) for name, spec in source.fields.items()
             if not isinstance(spec, Fixed)]

    def map_item(item: Any) -> dict:
        doc = dict(fixed)
        for name, get, mapping in found:
            value = get(item)
            if value is not None:
                doc[name] = value if mapping is None else mapping.get(_map_key(value), value)
        for name in fixed.keys() & source.values.keys():
            doc[name] = source.values[name].get(_map_key(doc[name]), doc[name])
        return doc

    return map_item


def record_of(item: Any, map_item: Callable[[Any], dict], now: datetime) -> tuple[dict | None, str | None, str | None]:
    """(record, test_id, None) for an item that makes a valid record, else (None, test_id or None,
    what is wrong: every failing field, as one line)."""
    if not isinstance(item, dict):
        return None, None, "the item is not a JSON object"
    doc = map_item(item)
    record, errors = validate_record(doc, now)
    if errors:
        test_id = doc.get("test_id")
        return None, test_id if check_id(test_id) is None else None, "; ".join(
            f"{e['field']} {e['message']}" for e in errors)
    return record, record["test_id"], None


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
