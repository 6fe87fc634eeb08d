"""Counters (clinic_counts, clinic_times, hourly_ingest, folded in behind clinic marks), and the
`check` and `backup` commands on still databases."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from records_service.store.sqlite import SQLiteStore as Store
from records_service.store.sqlite import counters as counters_module
from records_service.store.sqlite.migrations import SCHEMA_VERSION, migrate
from tests.live import REPO
from tests.old_schemas import database_at, insert_as_schema


def make(test_id: str, clinic_id: str = "C001", **fields) -> dict:
    return {"test_id": test_id, "clinic_id": clinic_id, "patient_id": "P1", "test_type": "CBC", "result": 1,
            "unit": None, "status": "final", "collected_at": "2025-05-01T10:00:00Z", "notes": None, **fields}


def kept_and_true(path) -> tuple[list, list]:
    """(what the counters say, a recount of the records): clinic, test type, status, count rows."""
    conn = sqlite3.connect(path)
    try:
        truth, kept = counters_module.COUNTER_CHECKS["clinic_counts"]
        return sorted(conn.execute(kept).fetchall()), sorted(conn.execute(truth).fetchall())
    finally:
        conn.close()


def folded(path) -> tuple[dict, dict]:
    """What the counter tables hold, without the tails: (clinic, type, status) -> n, hour -> n."""
    conn = sqlite3.connect(path)
    try:
        return ({(c, t, s): n for c, t, s, n in conn.execute("SELECT * FROM clinic_counts")},
                dict(conn.execute("SELECT hour, total FROM hourly_ingest")))
    finally:
        conn.close()


def cli(*args: str, db_path, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "records_service", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO), "RECORDS_DB_PATH": str(db_path)})


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "records.db"
    s = Store(str(path))
    s.insert(make("a"), request_id="r1", now="2025-06-01T10:59:59.999Z")
    s.insert(make("b"), request_id="r2", now="2025-06-01T11:00:00.000Z")
    s.insert(make("c", "C002"), request_id="r3", now="2025-06-01T11:30:00.000Z")
    s.migrate()  # folds every tail
    s.close()
    return path


def test_every_insert_is_counted_by_clinic_group_and_by_hour_of_ingest_once_folded(db):
    assert folded(db) == ({("C001", "CBC", "final"): 2, ("C002", "CBC", "final"): 1},
                          {"2025-06-01T10": 1, "2025-06-01T11": 2})


def test_records_not_yet_folded_are_counted_from_their_tail_and_folding_changes_no_figure(tmp_path):
    store = Store(str(tmp_path / "r.db"))
    store.insert(make("a"), request_id="r", now="2025-06-01T10:00:00.000Z")
    store.migrate()
    store.insert(make("b", status="preliminary", collected_at="2025-04-01T00:00:00Z"), request_id="r",
                 now="2025-06-01T10:00:00.000Z")
    tail = store.clinic_stats("C001")
    assert folded(tmp_path / "r.db")[0] == {("C001", "CBC", "final"): 1}  # b is in the tail
    assert tail == {"clinic_id": "C001", "total": 2, "by_test_type": {"CBC": 2},
                    "by_status": {"final": 1, "preliminary": 1},
                    "first_collected_at": "2025-04-01T00:00:00Z", "last_collected_at": "2025-05-01T10:00:00Z"}
    store.migrate()
    assert folded(tmp_path / "r.db")[0] == {("C001", "CBC", "final"): 1, ("C001", "CBC", "preliminary"): 1}
    assert store.clinic_stats("C001") == tail
    store.close()


def test_a_fold_of_some_clinics_counts_each_of_their_records_once_and_leaves_the_others_in_their_tails(tmp_path):
    store = Store(str(tmp_path / "r.db"))
    for n, clinic in enumerate(("C001", "C001", "C002", "C003")):
        store.insert(make(f"t{n}", clinic, status=("final", "preliminary")[n % 2]), request_id="r",
                     now=f"2025-06-01T1{n}:00:00.000Z")
    conn = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    assert counters_module.fold(conn, {"C001", "C002"}) == 3
    assert counters_module.fold(conn, {"C001", "C002"}) == 0
    assert folded(tmp_path / "r.db") == ({("C001", "CBC", "final"): 1, ("C001", "CBC", "preliminary"): 1,
                                          ("C002", "CBC", "final"): 1},
                                         {"2025-06-01T10": 1, "2025-06-01T11": 1, "2025-06-01T12": 1})
    marks = dict(conn.execute("SELECT clinic_id, counted_seq FROM clinic_marks"))
    seqs = dict(conn.execute("SELECT clinic_id, max(seq) FROM records GROUP BY 1"))
    assert marks == {"C001": seqs["C001"], "C002": seqs["C002"], "C003": 0}
    assert store.check()["counter_mismatches"] == {name: 0 for name in counters_module.COUNTER_CHECKS}
    assert counters_module.fold(conn) == 1  # every clinic: C003 is left
    assert store.check()["counter_mismatches"] == {name: 0 for name in counters_module.COUNTER_CHECKS}
    conn.close()
    store.close()


@pytest.mark.parametrize("statistics", [False, True], ids=["fresh", "analyzed"])
def test_a_fold_reads_records_only_by_searching_the_tails_of_its_clinics(tmp_path, statistics):
    store = Store(str(tmp_path / "r.db"))
    for n in range(200):
        store.insert(make(f"t{n}", f"C{n % 3:03d}" if n < 190 else "C009"), request_id="r", now="2025-06-01T10:00:00.000Z")
    store.migrate()
    conn = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    if statistics:
        conn.execute("ANALYZE")
    for statement in counters_module.FOLD_STATEMENTS:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement, ('["C001"]',))]
        reads = [step for step in plan if " records" in step or " r " in step or step.endswith(" r")]
        assert reads and all(step.startswith("SEARCH") and "PRIMARY KEY (clinic_id=?" in step for step in reads), plan
    conn.close()
    store.close()


@pytest.mark.parametrize("fold_first", [True, False], ids=["counted", "in the tail"])
def test_a_correction_moves_its_record_between_groups_and_keeps_first_and_last_exact(tmp_path, fold_first):
    store = Store(str(tmp_path / "r.db"))
    for n, day in enumerate(("01", "02", "03")):
        store.insert(make(f"t{n}", collected_at=f"2025-05-{day}T00:00:00Z"), request_id="r", now="2025-06-01T10:00:00.000Z")
    if fold_first:
        store.migrate()
    # t0 holds the clinic's earliest collected_at; its correction moves it to the latest.
    store.correct(make("t0", status="corrected", collected_at="2025-05-09T00:00:00Z"), expected=frozenset({1}),
                  request_id="fix", now="2025-06-01T11:00:00.000Z")
    store.void("t1", expected=frozenset({1}), request_id="void", now="2025-06-01T11:00:00.000Z")
    assert store.clinic_stats("C001") == {
        "clinic_id": "C001", "total": 3, "by_test_type": {"CBC": 3},
        "by_status": {"corrected": 1, "entered-in-error": 1, "final": 1},
        "first_collected_at": "2025-05-02T00:00:00Z", "last_collected_at": "2025-05-09T00:00:00Z"}
    kept, truth = kept_and_true(tmp_path / "r.db")
    assert kept == truth == [("C001", "CBC", "corrected", 1), ("C001", "CBC", "entered-in-error", 1),
                             ("C001", "CBC", "final", 1)]
    assert store.check()["counter_mismatches"] == {name: 0 for name in counters_module.COUNTER_CHECKS}
    store.close()


def test_a_correction_reads_and_writes_the_same_whatever_the_size_of_its_clinic(tmp_path):
    """No scan inside a write: the SQLite VM steps of correcting the record holding its clinic's
    earliest collected_at are the same at 200 and at 20,000 records (a scan would grow 100x)."""

    def steps_to_correct(records: int) -> int:
        store = Store(str(tmp_path / f"{records}.db"))
        rows = [make(f"t{n}", collected_at=f"2025-05-01T{n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z")
                for n in range(records)]
        store.insert_batch(rows, request_id="load", now="2025-06-01T10:00:00.000Z", atomic=False)
        store.migrate()
        conn = store._db.connection()
        steps = [0]

        def count():
            steps[0] += 1

        conn.set_progress_handler(count, 1)
        store.correct(make("t0", collected_at="2025-05-09T00:00:00Z"), expected=frozenset({1}), request_id="fix",
                      now="2025-06-01T11:00:00.000Z")
        conn.set_progress_handler(None, 1)
        assert store.clinic_stats("C001")["first_collected_at"] == "2025-05-01T00:00:01Z"
        store.close()
        return steps[0]

    small, large = steps_to_correct(200), steps_to_correct(20_000)
    assert large < small * 1.5, (small, large)


def test_a_new_database_is_made_from_the_schema_and_counts_from_its_first_record(tmp_path):
    store = Store(str(tmp_path / "r.db"))
    store.insert(make("a"), request_id="r", now="2025-06-01T00:10:00.000Z")
    store.migrate()
    store.close()
    conn = sqlite3.connect(tmp_path / "r.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT * FROM clinic_marks").fetchall() != []
    assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")} == {
        "records_one_version_at_a_time", "records_keep_superseded", "records_never_deleted",
        "record_versions_never_updated", "record_versions_never_deleted"}
    conn.close()


def test_migration_8_counts_what_schema_7_held(tmp_path):
    path = tmp_path / "v7.db"
    conn = database_at(path, 7)
    for n, clinic in enumerate(["C001", "C001", "C002"]):
        insert_as_schema(7, conn, make(f"t{n}", clinic), "r", f"2025-06-01T0{n}:00:00.000Z")
    migrate(conn)
    conn.close()
    assert folded(path) == ({("C001", "CBC", "final"): 2, ("C002", "CBC", "final"): 1},
                            {"2025-06-01T00": 1, "2025-06-01T01": 1, "2025-06-01T02": 1})
    kept, truth = kept_and_true(path)
    assert kept == truth


# -- check -----------------------------------------------------------------------------------

def test_check_passes_a_sound_database(db, tmp_path):
    out = cli("check", db_path=db, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"integrity ok, schema version {SCHEMA_VERSION}, 3 records" in out.stdout


def test_check_fails_counters_that_disagree_with_the_records(db, tmp_path):
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE clinic_counts SET records = 7 WHERE clinic_id = 'C002'")
    conn.close()
    out = cli("check", db_path=db, cwd=tmp_path)
    assert out.returncode == 1
    assert "clinic_counts: 2 counter rows disagree" in out.stdout


def test_check_fails_an_older_schema_and_names_both_versions(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    migrate(conn, upto=1)
    conn.close()
    out = cli("check", str(path), db_path=tmp_path / "unused.db", cwd=tmp_path)
    assert out.returncode == 1
    assert f"schema version 1, this code expects {SCHEMA_VERSION}" in out.stdout


def test_check_fails_an_index_that_disagrees_with_its_table(db, tmp_path):
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA writable_schema = ON")  # the index now claims to cover another column
    conn.execute("UPDATE sqlite_schema SET sql = 'CREATE INDEX records_by_patient ON records (status, seq)'"
                 " WHERE name = 'records_by_patient'")
    conn.close()
    out = cli("check", db_path=db, cwd=tmp_path)
    assert out.returncode == 1
    assert "integrity FAILED" in out.stdout and "problem: integrity: " in out.stdout


def test_check_fails_a_file_with_damaged_pages(db, tmp_path):
    with open(db, "r+b") as f:
        f.seek(4096)  # keep the header page, damage the rest
        f.write(b"\xff" * 8192)
    out = cli("check", db_path=db, cwd=tmp_path)
    assert out.returncode == 1
    assert "malformed" in out.stderr or "integrity FAILED" in out.stdout


@pytest.mark.parametrize("content", [None, b"not a database at all" * 200])
def test_check_fails_a_missing_file_or_one_that_is_not_a_database_and_creates_nothing(tmp_path, content):
    path = tmp_path / "r.db"
    if content is not None:
        path.write_bytes(content)
    out = cli("check", db_path=path, cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.startswith("records_service check: ")
    assert path.exists() == (content is not None)


# -- backup ------------------------------------------------------------------------------------

def test_backup_writes_one_self_contained_file_that_checks_clean(db, tmp_path):
    dest = tmp_path / "copy.db"
    out = cli("backup", str(dest), db_path=db, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"backed up 3 records (schema version {SCHEMA_VERSION})" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("copy")) == ["copy.db"]
    conn = sqlite3.connect(dest)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert [r[0] for r in conn.execute("SELECT test_id FROM records ORDER BY seq")] == ["a", "b", "c"]
    conn.close()
    assert cli("check", str(dest), db_path=db, cwd=tmp_path).returncode == 0


def test_backup_never_overwrites_and_never_creates_a_source(db, tmp_path):
    dest = tmp_path / "copy.db"
    dest.write_bytes(b"precious")
    out = cli("backup", str(dest), db_path=db, cwd=tmp_path)
    assert out.returncode == 1 and "already exists" in out.stderr
    assert dest.read_bytes() == b"precious"
    missing = tmp_path / "nowhere.db"
    out = cli("backup", str(tmp_path / "other.db"), db_path=missing, cwd=tmp_path)
    assert out.returncode == 1 and not missing.exists() and not (tmp_path / "other.db").exists()
