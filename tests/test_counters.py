"""Dashboard counters (migration 5) and the `check` and `backup` commands on still databases."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from records_service import store
from records_service.store import Store, _insert_row, _statements, migrate
from tests.live import REPO
from tests.old_schemas import insert_as_schemas_2_to_6


def make(test_id: str, clinic_id: str = "C001") -> dict:
    return {"test_id": test_id, "clinic_id": clinic_id, "patient_id": "P1", "test_type": "CBC", "result": 1,
            "unit": None, "status": "final", "collected_at": "2025-05-01T10:00:00Z", "notes": None}


def counters(path) -> tuple[dict, dict]:
    conn = sqlite3.connect(path)
    try:
        return (dict(conn.execute("SELECT clinic_id, sum(records) FROM clinic_counts GROUP BY clinic_id")),
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
    s.close()
    return path


def test_a_trigger_body_stays_one_statement():
    script = "CREATE TABLE t (x TEXT); CREATE TRIGGER g AFTER INSERT ON t BEGIN SELECT 1; SELECT ';'; END; SELECT 2;"
    assert [s.split()[0] for s in _statements(script)] == ["CREATE", "CREATE", "SELECT"]
    assert _statements(script)[1].endswith("END;")


def test_every_insert_is_counted_by_clinic_and_by_hour_of_ingest(db):
    assert counters(db) == ({"C001": 2, "C002": 1}, {"2025-06-01T10": 1, "2025-06-01T11": 2})


def test_a_correction_in_place_counts_nothing(db):
    conn = sqlite3.connect(db, isolation_level=None)
    # What a correction or void does (issue 6): the row changes in place, clinic_id and created_at do not.
    conn.execute("UPDATE records SET version = 2, status = 'corrected', updated_at = '2025-06-02T00:00:00.000Z'"
                 " WHERE test_id = 'a'")
    conn.close()
    assert counters(db) == ({"C001": 2, "C002": 1}, {"2025-06-01T10": 1, "2025-06-01T11": 2})


def test_migration_5_counts_the_records_an_older_schema_already_holds(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, upto=4)  # the schema before the counters
    for n, clinic in enumerate(["C001", "C001", "C002"]):
        insert_as_schemas_2_to_6(conn, make(f"t{n}", clinic), "r", f"2025-06-01T0{n}:00:00.000Z")
    migrate(conn)
    conn.close()
    assert counters(path) == ({"C001": 2, "C002": 1},
                              {"2025-06-01T00": 1, "2025-06-01T01": 1, "2025-06-01T02": 1})
    _insert_row(sqlite3.connect(path, isolation_level=None), make("later", "C002"), "r", "2025-06-01T02:10:00.000Z")
    assert counters(path)[0] == {"C001": 2, "C002": 2}


def test_from_schema_7_the_store_counts_each_insert_once_where_the_trigger_did(tmp_path):
    path = tmp_path / "v6.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, upto=6)  # hourly_ingest kept by migration 5's trigger
    insert_as_schemas_2_to_6(conn, make("t0"), "r", "2025-06-01T00:10:00.000Z")
    migrate(conn)
    assert "records_counted" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    _insert_row(conn, make("t1", "C002"), "r", "2025-06-01T00:20:00.000Z")
    conn.close()
    assert counters(path) == ({"C001": 1, "C002": 1}, {"2025-06-01T00": 2})


# -- check -----------------------------------------------------------------------------------

def test_check_passes_a_sound_database(db, tmp_path):
    out = cli("check", db_path=db, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"integrity ok, schema version {store.SCHEMA_VERSION}, 3 records" in out.stdout


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
    assert f"schema version 1, this code expects {store.SCHEMA_VERSION}" in out.stdout


def test_check_fails_an_index_that_disagrees_with_its_table(db, tmp_path):
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA writable_schema = ON")  # the index now claims to cover another column
    conn.execute("UPDATE sqlite_schema SET sql = 'CREATE INDEX records_by_clinic ON records (patient_id, seq)'"
                 " WHERE name = 'records_by_clinic'")
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
    assert f"backed up 3 records (schema version {store.SCHEMA_VERSION})" in out.stdout
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
