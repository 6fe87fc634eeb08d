"""`python -m records_service seed`: synthetic records that are exactly what the service would store."""

from __future__ import annotations

import fcntl
import io
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from records_service.store import open_store, prepare
from records_service.store.sqlite import SQLiteStore
from records_service.store.sqlite.migrations import SCHEMA_VERSION
from records_service.__main__ import main
from records_service.seed import (ProgressBar, clinic_ids, rows_made_in_another_process, seed_rows,
                                  seed_rows_in_key_order)
from records_service.validate import client_fields, validate_record
from tests.live import REPO, on_a_terminal

NOW = datetime(2025, 6, 1, 12, 0, 0, 987654, tzinfo=timezone.utc)


def test_every_seeded_row_is_what_store_prepare_makes_of_its_record():
    for row in seed_rows(5_000, 7, NOW, rng_seed=3, run="abc123"):
        stored = json.loads(row[-1])
        record, errors = validate_record(client_fields(stored), NOW)
        assert errors == [] and record == client_fields(stored)
        # Same columns, same JSON text (key order, separators, number forms) as a POST would store.
        assert prepare(record, stored["request_id"], stored["created_at"]) == row


def test_seeded_records_look_like_a_clinic_network():
    rows = list(seed_rows(50_000, 20, NOW, rng_seed=1))
    docs = [json.loads(row[-1]) for row in rows]
    assert len({d["test_id"] for d in docs}) == 50_000
    per_clinic = Counter(d["clinic_id"] for d in docs)
    assert set(per_clinic) == set(clinic_ids(20))
    assert per_clinic["C0001"] > 3 * per_clinic["C0020"]  # big labs and small practices
    statuses = Counter(d["status"] for d in docs)
    assert set(statuses) == {"final", "preliminary", "corrected", "cancelled"}
    assert statuses["final"] > 0.8 * len(docs)
    assert len({d["test_type"] for d in docs}) >= 15
    assert any(isinstance(d["result"], str) for d in docs) and any(isinstance(d["result"], float) for d in docs)
    assert {d["unit"] for d in docs if d["test_type"] == "HbA1c"} == {"%"}
    collected = sorted(d["collected_at"] for d in docs)
    year_before = (NOW - timedelta(days=366)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert year_before <= collected[0] and collected[-1] <= NOW.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert collected[-1][:7] != collected[0][:7]  # spread over the year, not bunched
    patients = Counter((d["clinic_id"], d["patient_id"]) for d in docs)
    assert 4 <= len(docs) / len(patients) <= 12  # several tests per patient
    assert {d["notes"] for d in docs} > {None}


def test_rows_in_key_order_are_seed_rows_grouped_by_clinic_each_in_its_order():
    rows = list(seed_rows_in_key_order(20_000, 9, NOW, rng_seed=4, run="k3y"))
    made = list(seed_rows(20_000, 9, NOW, rng_seed=4, run="k3y"))
    assert sorted(rows) == sorted(made)
    place = {row[0]: n for n, row in enumerate(made)}
    assert [(row[1], place[row[0]]) for row in rows] == sorted((row[1], place[row[0]]) for row in rows)


def test_rows_made_in_another_process_are_the_same_rows_and_closing_early_ends_it():
    made = rows_made_in_another_process(seed_rows_in_key_order, 25_000, 5, NOW, rng_seed=6, run="0th3r")
    assert list(made) == list(seed_rows_in_key_order(25_000, 5, NOW, rng_seed=6, run="0th3r"))
    assert multiprocessing.active_children() == []

    made = rows_made_in_another_process(seed_rows_in_key_order, 1_000_000, 5, NOW)
    assert len(next(made)) == 9
    made.close()
    assert multiprocessing.active_children() == []


def _schema(path) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    finally:
        conn.close()


@pytest.mark.both_engines
def test_a_seed_into_an_empty_database_stores_seed_rows_documents_in_order_with_exact_counters(settings, engine):
    store = open_store(settings)
    try:
        store.migrate()
        for _ in store.bulk_insert(seed_rows_in_key_order(6_000, 7, NOW, rng_seed=3, run="3mpty")):
            pass
        check = store.check()
        assert check["records"] == 6_000
        assert set(check["counter_mismatches"].values()) == {0}
        made = list(seed_rows(6_000, 7, NOW, rng_seed=3, run="3mpty"))
        for clinic in clinic_ids(7):
            stored = [doc for chunk in store.export_docs({"clinic_id": clinic}) for doc in chunk]
            assert stored == [row[-1] for row in made if row[1] == clinic]  # the same documents, in ingest order
            assert store.clinic_stats(clinic)["total"] == len(stored)
    finally:
        store.close()


def test_the_load_stores_every_column_as_an_insert_would_and_leaves_the_schema_and_wal_as_they_were(tmp_path):
    fresh = SQLiteStore(str(tmp_path / "fresh.db"))
    fresh.migrate()
    fresh.close()
    store = SQLiteStore(str(tmp_path / "seed.db"))
    for _ in store.bulk_insert(seed_rows_in_key_order(3_000, 4, NOW, rng_seed=8, run="c0lumn")):
        pass
    store.close()
    conn = sqlite3.connect(tmp_path / "seed.db")
    stored = conn.execute("SELECT test_id, clinic_id, patient_id, test_type, status, collected_at, request_id, doc,"
                          " version, key_id FROM records ORDER BY clinic_id, seq").fetchall()
    journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    made = seed_rows(3_000, 4, NOW, rng_seed=8, run="c0lumn")
    expected = sorted(((*row[:6], *row[7:], 1, None) for row in made), key=lambda row: row[1])  # stable: seq order
    assert stored == expected
    assert journal_mode == "wal"
    assert _schema(tmp_path / "seed.db") == _schema(tmp_path / "fresh.db")


def test_a_load_while_another_connection_has_the_file_open_stays_in_wal_mode_and_never_blocks_its_reads(tmp_path):
    path = tmp_path / "seed.db"
    store = SQLiteStore(str(path))
    store.migrate()
    reader = sqlite3.connect(path, timeout=0)
    assert reader.execute("SELECT count(*) FROM records").fetchone() == (0,)
    seen = [reader.execute("SELECT count(*) FROM records").fetchone()[0]
            for _ in store.bulk_insert(seed_rows_in_key_order(120_000, 3, NOW, rng_seed=2), chunk_rows=20_000)]
    assert seen == [0] * 6  # the load's transaction is not committed yet, and readers read on
    assert reader.execute("SELECT count(*) FROM records").fetchone() == (120_000,)
    assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    reader.close()
    assert set(store.check()["counter_mismatches"].values()) == {0}
    store.close()


# The seed command with a 4 MiB load cache, so pages of the load reach the database file (with
# the journal holding what they overwrote) long before its commit.
SEED_WITH_A_SMALL_CACHE = ("import sys, records_service.store.sqlite as engine; engine.LOAD_CACHE_KIB = 4096;"
                           " from records_service.__main__ import main; sys.exit(main(sys.argv[1:]))")


def test_a_seed_killed_midway_leaves_an_empty_database_that_opens_and_seeds_again(tmp_path, monkeypatch):
    path = tmp_path / "seed.db"
    env = {**os.environ, "RECORDS_DB_PATH": str(path), "PYTHONPATH": str(REPO)}
    seeding = subprocess.Popen([sys.executable, "-c", SEED_WITH_A_SMALL_CACHE, "seed", "--records", "2000000"],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(f"{path}-journal"):  # the load runs with a rollback journal
            assert seeding.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        empty_size = os.path.getsize(path)
        while os.path.getsize(path) < empty_size + (16 << 20):  # the load's pages are in the file
            assert seeding.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        seeding.send_signal(signal.SIGKILL)
        seeding.wait()
    assert os.path.exists(f"{path}-journal")
    store = SQLiteStore(str(path))
    store.migrate()  # the first connection rolls the load back and switches the file to WAL again
    assert store._db.read("PRAGMA journal_mode") == [("wal",)]
    check = store.check()
    assert check["integrity"] == ["ok"] and check["records"] == 0
    assert set(check["counter_mismatches"].values()) == {0}
    store.close()
    monkeypatch.setenv("RECORDS_DB_PATH", str(path))
    monkeypatch.chdir(tmp_path)
    assert main(["seed", "--records", "500", "--clinics", "3"]) == 0
    assert main(["check"]) == 0


def test_the_seed_command_adds_records_through_migrations(tmp_path, monkeypatch, capsys):
    db = tmp_path / "seed.db"
    monkeypatch.setenv("RECORDS_DB_PATH", str(db))
    monkeypatch.chdir(tmp_path)
    assert main(["seed", "--records", "1200", "--clinics", "3"]) == 0
    assert main(["seed", "--records", "300", "--clinics", "3"]) == 0  # a second run adds, never collides
    out = capsys.readouterr().out
    assert main(["check"]) == 0
    assert "seeded 1,200 records over 3 clinics" in out and "records/s" in out
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT count(*), count(DISTINCT clinic_id) FROM records").fetchone() == (1500, 3)


def test_the_seed_command_says_why_when_another_writer_holds_the_database(tmp_path, monkeypatch, capsys):
    db = tmp_path / "seed.db"
    monkeypatch.setenv("RECORDS_DB_PATH", str(db))
    monkeypatch.setenv("RECORDS_BUSY_TIMEOUT_MS", "200")
    monkeypatch.chdir(tmp_path)
    assert main(["seed", "--records", "10", "--clinics", "1"]) == 0
    other_writer = os.open(f"{db}-writer", os.O_RDWR)  # as a worker holding its turn
    fcntl.flock(other_writer, fcntl.LOCK_EX)
    try:
        assert main(["seed", "--records", "10", "--clinics", "1"]) == 1
    finally:
        os.close(other_writer)
    assert "seed failed: the database stayed locked by other writers past the busy bound" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["seed"], ["seed", "--records", "0"], ["seed", "--records", "10", "--clinics", "-1"]])
def test_bad_seed_arguments_stop_with_usage(argv):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_redraws_one_line_on_a_terminal():
    ticks = iter([0.0, 1.0, 2.0])
    out = Terminal()
    bar = ProgressBar(1000, stream=out, clock=lambda: next(ticks))
    bar.update(500)
    bar.update(1000)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n")
    assert " 50.0% 500/1,000" in text and "500 records/s" in text
    assert "100.0% 1,000/1,000" in text


def test_the_progress_bar_is_silent_anywhere_else():
    out = io.StringIO()
    bar = ProgressBar(10, stream=out)
    bar.update(10)
    bar.close()
    assert out.getvalue() == ""


def _seed_process(tmp_path, stderr) -> subprocess.CompletedProcess | subprocess.Popen:
    env = {**os.environ, "RECORDS_DB_PATH": str(tmp_path / "tty.db"), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "records_service", "seed", "--records", "30000", "--clinics", "4"],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=stderr, timeout=60)


def test_the_command_shows_the_bar_on_a_terminal_and_not_in_a_pipe(tmp_path):
    done, shown = on_a_terminal(lambda terminal: _seed_process(tmp_path, terminal))
    assert done.returncode == 0
    assert b"\r[" in shown and b"30,000/30,000" in shown

    piped = _seed_process(tmp_path, subprocess.PIPE)
    assert piped.returncode == 0 and b"\r[" not in piped.stderr
    assert b"seeded 30,000 records" in piped.stdout
