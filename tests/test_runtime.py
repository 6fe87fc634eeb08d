"""The failure log every worker of one master shares."""

from __future__ import annotations

import os

from records_service.runtime import MAX_CHARS, SLOTS, FailureLog


def failure(n: int, path: str = "/tests", status: int = 503) -> dict:
    return {"at": f"t{n}", "status": status, "type": "busy", "method": "POST", "path": path, "request_id": f"r{n}"}


def test_a_forked_process_records_what_its_parent_then_reads():
    log = FailureLog()
    pid = os.fork()
    if pid == 0:  # the child: a gunicorn worker, in effect
        log.record(failure(1))
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    total, entries = log.recent()
    assert total == 1 and entries == [{**failure(1), "repeats": 1}]


def test_a_failure_repeated_back_to_back_is_one_entry_with_its_latest_request():
    log = FailureLog()
    log.record(failure(1, "/ready"))
    log.record(failure(2))
    log.record(failure(3))
    log.record(failure(4))
    total, entries = log.recent()
    assert total == 4
    assert [(e["request_id"], e["repeats"]) for e in entries] == [("r4", 3), ("r1", 1)]


def test_the_ring_keeps_the_newest_slots_and_cuts_long_strings():
    log = FailureLog()
    for n in range(SLOTS + 7):
        log.record(failure(n, path=f"/tests/{n}" + "\u00e9" * 500))
    total, entries = log.recent()
    assert total == SLOTS + 7 and len(entries) == SLOTS
    assert [e["request_id"] for e in entries] == [f"r{n}" for n in range(SLOTS + 6, 6, -1)]
    assert all(len(e["path"]) == MAX_CHARS for e in entries)
