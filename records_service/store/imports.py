"""What an import page does to the records it carries and to its source's progress: the rules
every engine applies inside the page's one transaction (API.md, "Import from upstream APIs").

A record whose test_id is new is created; one stored with the same client fields is left alone
(`unchanged`); with different fields it gets a new version, as a PUT would (`updated`). A voided
record, one of another clinic, or one whose patient_id differs (which a PUT refuses) is not
changed and is reported. The source's progress is one state per source: the current (or last)
run's position, counts and first failures, and the watermark of the last complete run.
"""

from __future__ import annotations

import json

from ..validate import VOIDED_STATUS, client_fields

MAX_FAILURES = 100


class ImportConflict(Exception):
    """Another run of the same source committed meanwhile: this one stops, nothing of its page
    is stored (two runs of one source at once would otherwise overwrite each other's position)."""
COUNTS = ("pages", "fetched", "created", "updated", "unchanged", "failed")


def judge(stored: dict | None, record: dict) -> tuple[str, str | None]:
    """What importing `record` does given the stored record of its test_id (None when new):
    ("created" | "unchanged" | "updated" | "failed", why it failed)."""
    if stored is None:
        return "created", None
    if stored["clinic_id"] != record["clinic_id"]:
        return "failed", "the test_id belongs to another clinic's record; not changed"
    if stored["status"] == VOIDED_STATUS:
        return "failed", "the stored record is voided (entered-in-error); not changed"
    if client_fields(stored) == record:
        return "unchanged", None
    if stored["patient_id"] != record["patient_id"]:
        return "failed", "patient_id differs from the stored record's, which a correction cannot change; not changed"
    return "updated", None


def advance(state: dict | None, source: str, position: dict, outcomes: list[dict], *, request_id: str,
            now: str) -> dict:
    """The source's progress after a page: `position` is what the run says of the page (its
    number, the next position or None for the last page, the run's since, items fetched, the
    items that failed before the store, the run's largest watermark value); `outcomes` what the
    store did with each record ({"index", "test_id", "outcome", "detail"}). Page 1 starts a run."""
    _check_turn(state, position["page"], request_id)
    if state is None or position["page"] == 1:
        state = {"source": source, "request_id": request_id, "started_at": now, "watermark":
                 state["watermark"] if state else None, "failures": [], **dict.fromkeys(COUNTS, 0)}
    else:
        state = {**state, "failures": list(state["failures"])}
    failed = [{"page": position["page"], "index": o["index"], "test_id": o["test_id"], "detail": o["detail"]}
              for o in outcomes if o["outcome"] == "failed"]
    failures = sorted([*position["failures"], *failed], key=lambda f: f["index"])
    state["failures"] = (state["failures"] + failures)[:MAX_FAILURES]
    for name in ("created", "updated", "unchanged"):
        state[name] += sum(1 for o in outcomes if o["outcome"] == name)
    state["failed"] += len(failures)
    state["fetched"] += position["fetched"]
    complete = position["next"] is None
    state.update(pages=position["page"], next=position["next"], since=position["since"], updated_at=now,
                 run_watermark=position["watermark"], complete=complete)
    if complete and position["watermark"] is not None:
        state["watermark"] = position["watermark"]
    return state


def _check_turn(state: dict | None, page: int, request_id: str) -> None:
    """A page continues its own run, right after the page it committed last; a first page
    starts a run only when no other run is half-way."""
    if page == 1:
        if state is not None and not state["complete"] and state["request_id"] != request_id:
            raise ImportConflict(f"run {state['request_id']} of this source is under way")
    elif state is None or state["request_id"] != request_id or state["pages"] != page - 1:
        raise ImportConflict("another run of this source committed meanwhile")


# A source's progress as every engine stores it: one row, its JSON-valued columns as JSON text.
PROGRESS_COLUMNS = ("source", "request_id", "started_at", "updated_at", "complete", "next", "since", *COUNTS,
                    "failures", "watermark", "run_watermark")
_JSON_COLUMNS = ("next", "failures", "watermark", "run_watermark")


def progress_of(row: tuple) -> dict:
    """The progress a stored row (PROGRESS_COLUMNS) holds."""
    state = dict(zip(PROGRESS_COLUMNS, row))
    for name in _JSON_COLUMNS:
        state[name] = None if state[name] is None else json.loads(state[name])
    state["complete"] = bool(state["complete"])
    return state


def progress_row(state: dict) -> tuple:
    """The row (PROGRESS_COLUMNS) that stores a progress."""
    return tuple(json.dumps(state[name]) if name in _JSON_COLUMNS and state[name] is not None
                 else int(state[name]) if name == "complete" else state[name] for name in PROGRESS_COLUMNS)
