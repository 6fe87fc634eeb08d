"""One request's story from JSON log lines, as a timeline a person can read.

Pure functions over lines of text: the command line feeds them files or standard input.
Lines that are not JSON objects (a traceback printed by hand, a truncated line, another
program's output) are skipped, never fatal.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Iterable

# Shown in the fixed columns of each timeline line; everything else follows as key=value.
_COLUMNS = ("ts", "level", "logger", "message", "request_id", "exc_info")


def entries_of(lines: Iterable[str], request_id: str) -> list[dict]:
    """The log entries carrying `request_id`, as read."""
    found = []
    for line in lines:
        if request_id not in line:  # cheap pre-filter: most lines of a big log are other requests'
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("request_id") == request_id:
            found.append(entry)
    return found


def _moment(entry: dict) -> datetime | None:
    try:
        return datetime.fromisoformat(str(entry["ts"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None


def _value(value) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in "\"=" for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)


def timeline(entries: list[dict], request_id: str) -> list[str]:
    """A header, then one line per entry in time order (entries from several files interleave;
    any without a time come first, as read): time, milliseconds since the first entry, level,
    logger, message, then the entry's other fields as key=value; tracebacks indented below."""
    if not entries:
        return []
    entries = sorted(entries, key=lambda e: str(e.get("ts", "")))
    moments = [m for m in map(_moment, entries) if m is not None]
    start = moments[0] if moments else None
    span = f", {(moments[-1] - start).total_seconds() * 1000:.0f} ms" if moments else ""
    lines = [f"request {request_id}: {len(entries)} log line{'s' * (len(entries) != 1)}{span}"]
    for entry in entries:
        moment = _moment(entry)
        offset = f"+{(moment - start).total_seconds() * 1000:.0f} ms" if moment and start else "?"
        fields = " ".join(f"{k}={_value(v)}" for k, v in entry.items() if k not in _COLUMNS)
        head = (f"{entry.get('ts', '-')}  {offset:>9}  {entry.get('level', '-'):<8} {entry.get('logger', '-')}: "
                f"{entry.get('message', '')}")
        lines.append(f"{head}  {fields}" if fields else head)
        if entry.get("exc_info"):
            lines.extend("    " + part for part in str(entry["exc_info"]).splitlines())
    return lines
