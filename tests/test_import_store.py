"""What an import page does in the store: the engine-neutral rules (store/imports.py) and one
transaction per page with the source's progress (on the store the settings name)."""

import pytest

from records_service.store import open_store
from records_service.store.imports import MAX_FAILURES, ImportConflict, advance, judge

NOW = "2025-06-01T12:00:00.000Z"


@pytest.fixture
def store(settings):
    store = open_store(settings)
    yield store
    store.close()


def stored(record, **changes):
    return {**record, "collected_at": "2025-05-01T04:30:00Z", "created_at": NOW, "updated_at": NOW, "version": 1,
            "request_id": "r", **changes}


@pytest.fixture
def clean(record):
    return {**record, "collected_at": "2025-05-01T04:30:00Z"}


def test_judge(clean):
    assert judge(None, clean) == ("created", None)
    assert judge(stored(clean), clean) == ("unchanged", None)
    assert judge(stored(clean, result=6.1), clean) == ("updated", None)
    assert judge(stored(clean, clinic_id="C999"), clean)[0] == "failed"
    assert "voided" in judge(stored(clean, status="entered-in-error"), clean)[1]
    assert "patient_id" in judge(stored(clean, patient_id="P-other", result=1), clean)[1]


def position(page, next_=None, fetched=1, failures=(), watermark=None):
    return {"page": page, "next": next_, "since": "", "fetched": fetched, "failures": list(failures),
            "watermark": watermark}


def outcome(index, kind, detail=None):
    return {"index": index, "test_id": f"T-{index}", "outcome": kind, "detail": detail}


def test_advance_counts_a_run_and_saves_the_watermark_only_when_it_completes():
    state = advance(None, "s", position(1, {"url": "u2"}, fetched=3, watermark="b",
                                        failures=[{"page": 1, "index": 2, "test_id": None, "detail": "bad"}]),
                    [outcome(0, "created"), outcome(1, "failed", "voided")], request_id="r1", now=NOW)
    assert (state["pages"], state["fetched"], state["created"], state["failed"], state["complete"]) == (1, 3, 1, 2, False)
    assert [f["index"] for f in state["failures"]] == [1, 2]  # in page order
    assert state["watermark"] is None and state["run_watermark"] == "b"
    state = advance(state, "s", position(2, None, watermark="c"), [outcome(0, "unchanged")], request_id="r1", now=NOW)
    assert (state["pages"], state["unchanged"], state["complete"], state["watermark"]) == (2, 1, True, "c")
    again = advance(state, "s", position(1, None), [outcome(0, "updated")], request_id="r2", now=NOW)
    assert (again["request_id"], again["pages"], again["updated"], again["created"]) == ("r2", 1, 1, 0)
    assert again["watermark"] == "c"  # a run that saw no watermark value keeps the last one


def test_failures_keep_the_first_hundred():
    many = [{"page": 1, "index": i, "test_id": None, "detail": "bad"} for i in range(150)]
    state = advance(None, "s", position(1, {"url": "u"}, fetched=150, failures=many), [], request_id="r", now=NOW)
    assert state["failed"] == 150 and len(state["failures"]) == MAX_FAILURES


@pytest.mark.parametrize("page, request_id", [(2, "other"), (3, "r1"), (1, "other")])
def test_a_page_out_of_turn_is_a_conflict(page, request_id):
    state = advance(None, "s", position(1, {"url": "u2"}), [], request_id="r1", now=NOW)
    with pytest.raises(ImportConflict):
        advance(state, "s", position(page, {"url": "u3"}), [], request_id=request_id, now=NOW)


@pytest.mark.both_engines
def test_a_page_and_the_progress_commit_together_or_not_at_all(store, clean):
    store.import_page("s", [(0, {**clean, "test_id": "A-1"})], position(1, {"url": "u2"}), request_id="r1",
                      key_id="import:s", now=NOW)
    with pytest.raises(ImportConflict):  # found after the page's records were written: they roll back with it
        store.import_page("s", [(0, {**clean, "test_id": "B-1"})], position(2, {"url": "u3"}), request_id="r2",
                          key_id="import:s", now=NOW)
    assert store.current("B-1") is None
    progress = store.import_progress("s")
    assert (progress["request_id"], progress["pages"], progress["next"]) == ("r1", 1, {"url": "u2"})
    assert [run["source"] for run in store.import_runs()] == ["s"]
    assert store.audit("r1") == [{"test_id": "A-1", "version": 1, "action": "create", "at": NOW, "clinic_id": "C001",
                                  "key_id": "import:s"}]


@pytest.mark.both_engines
def test_a_page_creates_updates_and_leaves_alone_as_judged_and_counts_it(store, clean):
    first, changed = {**clean, "test_id": "A-1"}, {**clean, "test_id": "A-1", "result": 9.9}
    state = store.import_page("s", [(0, first), (1, changed), (2, {**clean, "test_id": "A-2"})],
                              position(1, {"url": "u2"}, fetched=3), request_id="r1", key_id="import:s", now=NOW)
    assert (state["created"], state["updated"], state["unchanged"]) == (2, 1, 0)
    state = store.import_page("s", [(0, changed)], position(2, None), request_id="r1", key_id="import:s", now=NOW)
    assert (state["unchanged"], state["complete"]) == (1, True)
    assert store.current("A-1").version == 2
    assert store.history_json("A-1")[1] == 2
    assert store.clinic_stats(clean["clinic_id"])["total"] == 2
