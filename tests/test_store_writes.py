"""How the store writes: writers take turns on a file lock; checkpoints come now and then, not per commit,
and mostly outside a writer's turn."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import random
import sqlite3
import time
import uuid
from datetime import datetime, timezone

import pytest

from records_service.seed import clinic_ids, seed_rows_in_key_order
from records_service.store import DuplicateRecord, StoreBusy
import records_service.store.sqlite as sqlite_engine
from records_service.store.sqlite import connection as store_module
from records_service.store.sqlite import SQLiteStore as Store


def make(test_id: str) -> dict:
    return {"test_id": test_id, "clinic_id": "C1", "patient_id": "P1", "test_type": "CBC", "result": 1,
            "unit": None, "status": "final", "collected_at": "2025-05-01T10:00:00Z", "notes": None}


def test_sqlites_automatic_checkpoint_is_off_for_the_service(tmp_path):
    store = Store(str(tmp_path / "r.db"))
    store.open()
    assert store._db.connection().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0


def test_commits_stay_in_the_wal_until_enough_commits_and_time_have_passed(tmp_path):
    path = tmp_path / "r.db"
    store = Store(str(path))
    store.open()
    sqlite3.connect(path, isolation_level=None).execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    size_before = os.path.getsize(path)
    store._db._last_checkpoint -= store_module.CHECKPOINT_EVERY_S  # as if the interval had passed
    for i in range(store_module.CHECKPOINT_EVERY_COMMITS - 1):
        store.insert(make(f"t{i}"), request_id="r", now="2025-06-01T00:00:00.000Z")
    assert os.path.getsize(path) == size_before, "a checkpoint ran before its number of commits"

    store.insert(make("last"), request_id="r", now="2025-06-01T00:00:00.000Z")
    assert os.path.getsize(path) > size_before, "no checkpoint after the number of commits and the interval"


def test_a_single_record_insert_that_splits_no_leaf_writes_one_page_of_each_of_its_four_b_trees(tmp_path,
                                                                                               monkeypatch):
    """What a POST writes at 100,000 records (issue 14): a page of the table and of the test_id,
    request and patient indexes, and nothing else (no counter, no page 1), when no leaf splits;
    a split adds its pages. Counted from the WAL, each insert alone after a checkpoint, with
    random UUIDs as the service makes them."""
    for knob in ("FOLD_EVERY_S", "FOLD_EVERY_RECORDS"):
        monkeypatch.setattr(sqlite_engine, knob, float("inf"))  # a fold is a write of its own
    monkeypatch.setattr(store_module, "CHECKPOINT_EVERY_COMMITS", float("inf"))
    path = tmp_path / "r.db"
    store = Store(str(path))
    for _ in store.bulk_insert(seed_rows_in_key_order(100_000, 500, datetime.now(timezone.utc), rng_seed=1)):
        pass
    conn = store._db.connection()
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    rng = random.Random(2)
    clinics = clinic_ids(500)

    def insert_one() -> None:
        record = {**make(str(uuid.UUID(int=rng.getrandbits(128), version=4))), "clinic_id": rng.choice(clinics),
                  "patient_id": f"P{rng.randrange(1, 100_000):06d}"}
        store.insert(record, request_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                     now="2025-06-01T00:00:00.000Z")

    for n in range(1000):  # a seed packs every leaf full: the first insert into each one splits it
        insert_one()
    frames = []
    for n in range(50):
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        insert_one()
        frames.append((os.path.getsize(f"{path}-wal") - 32) // (page_size + 24))
    assert min(frames) == 4 and frames.count(4) >= 10, f"frames of each insert: {sorted(frames)}"
    store.close()


def wal_generation(path) -> bytes:
    """The WAL header's salts, which change every time the WAL starts over (read, not checkpointed)."""
    with open(f"{path}-wal", "rb") as wal:
        return wal.read(24)[16:24]


def test_a_checkpoint_copies_after_the_turn_and_the_next_write_lets_the_wal_start_over(tmp_path):
    path = tmp_path / "r.db"
    store, other_worker = Store(str(path)), Store(str(path))
    store.open()
    other_worker.open()
    for i in range(store_module.CHECKPOINT_EVERY_COMMITS - 1):
        store.insert(make(f"t{i}"), request_id="r", now="2025-06-01T00:00:00.000Z")
    store._db._last_checkpoint -= store_module.CHECKPOINT_EVERY_S
    size_before = os.path.getsize(path)

    store.insert(make("due"), request_id="r", now="2025-06-01T00:00:00.000Z")  # the bulk copy, after its turn
    assert os.path.getsize(path) > size_before, "the WAL was not copied"
    other_worker.insert(make("meanwhile"), request_id="r", now="2025-06-01T00:00:00.000Z")
    generation = wal_generation(path)
    store.insert(make("next"), request_id="r", now="2025-06-01T00:00:00.000Z")  # copies the rest in its turn
    assert wal_generation(path) == generation
    other_worker.insert(make("restarts"), request_id="r", now="2025-06-01T00:00:00.000Z")
    assert wal_generation(path) != generation, "the WAL did not start over"
    assert store.count() == store_module.CHECKPOINT_EVERY_COMMITS + 3


def test_a_writer_waits_for_another_writers_turn_and_is_refused_at_the_bound(tmp_path):
    path = tmp_path / "r.db"
    store = Store(str(path), busy_timeout_ms=300)
    store.open()
    other_writer = os.open(f"{path}-writer", os.O_RDWR)  # as another worker holding its turn
    fcntl.flock(other_writer, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        with pytest.raises(StoreBusy):
            store.insert(make("blocked"), request_id="r", now="2025-06-01T00:00:00.000Z")
        assert time.monotonic() - started >= 0.3
    finally:
        fcntl.flock(other_writer, fcntl.LOCK_UN)
        os.close(other_writer)
    store.insert(make("blocked"), request_id="r", now="2025-06-01T00:00:00.000Z")
    assert store.count() == 1


def test_the_turn_is_given_back_after_a_failed_write(tmp_path):
    path = tmp_path / "r.db"
    store = Store(str(path), busy_timeout_ms=300)
    store.insert(make("a"), request_id="r", now="2025-06-01T00:00:00.000Z")
    with pytest.raises(DuplicateRecord):
        store.insert(make("a"), request_id="r", now="2025-06-01T00:00:00.000Z")  # a duplicate
    probe = os.open(f"{path}-writer", os.O_RDWR)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the store still held it
    finally:
        os.close(probe)


def _open_when_told(path: str, go, results) -> None:
    go.wait()
    try:
        Store(path).open()
        results.put("ready")
    except Exception as exc:  # reported to the test, which names it
        results.put(repr(exc))


def test_workers_opening_a_new_database_at_once_all_get_it_ready(tmp_path):
    # Five processes switch one new file to WAL at the same moment, 40 times over. SQLite
    # refuses all but one at once, busy handler or not, unless they take turns (before they
    # did, about 1 connection in 25 failed).
    fork = multiprocessing.get_context("fork")
    outcomes = []
    for attempt in range(40):
        go, results = fork.Event(), fork.Queue()
        processes = [fork.Process(target=_open_when_told, args=(str(tmp_path / f"{attempt}.db"), go, results))
                     for _ in range(5)]
        for process in processes:
            process.start()
        go.set()
        outcomes += [results.get(timeout=30) for _ in processes]
        for process in processes:
            process.join(30)
    assert [outcome for outcome in outcomes if outcome != "ready"] == []
