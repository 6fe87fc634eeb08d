"""Migrations: every older schema upgrades to exactly schema.sql, keeps its records, and several
servers starting at once migrate once."""

from __future__ import annotations

import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from urllib.parse import urlsplit

from pathlib import Path

import falcon.testing
import pytest

from records_service.store.sqlite import migrations
from tests.live import RawDatabase
from tests.old_schemas import INSERT_SQL, database_at, old_row
from records_service.app import create_app
from records_service.config import Settings
from records_service.store import open_store
from records_service.store.postgres import counters as postgres_counters, migrations as postgres_migrations
from records_service.seed import seed_rows
from records_service.store import prepare
from tests.test_listing import ids, make, next_url

NOW = datetime(2025, 6, 1, tzinfo=timezone.utc)


def version_1_database(path, records: list[dict] = (), seeded: int = 0) -> None:
    """A database exactly as schema 1 left it, holding `records` then `seeded` synthetic ones."""
    conn = database_at(path, 1)
    # Schema-1 code inserted the rows alone; there were no counts yet.
    rows = [old_row(prepare({"unit": None, "notes": None, **record}, "req-v1", "2025-05-31T00:00:00.000Z"))
            for record in records]
    conn.execute("BEGIN")
    conn.executemany(INSERT_SQL, rows + [old_row(row) for row in seed_rows(seeded, 10, NOW, rng_seed=2)])
    conn.execute("COMMIT")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()


def indexes(path) -> dict[str, str]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"))
    finally:
        conn.close()


def test_a_version_1_database_is_migrated_at_start_and_keeps_every_record(tmp_path, settings, clock):
    old = [make(f"v1-{i}", patient_id=f"P{i % 2}", status=("final", "cancelled")[i % 2]) for i in range(5)]
    version_1_database(settings.db_path, old)
    assert "records_by_patient" not in indexes(settings.db_path)

    client = falcon.testing.TestClient(create_app(settings, clock=clock))

    conn = sqlite3.connect(settings.db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.SCHEMA_VERSION
    assert len(conn.execute("SELECT value FROM meta WHERE key = 'cursor_secret'").fetchone()[0]) == 32
    found = indexes(settings.db_path)
    assert "(clinic_id, patient_id, seq)" in found["records_by_patient"]
    # The stats' counts start from the records that were there.
    assert conn.execute("SELECT clinic_id, test_type, status, records FROM clinic_counts ORDER BY status").fetchall() == [
        ("C1", "CBC", "cancelled", 2), ("C1", "CBC", "final", 3)]
    assert client.simulate_get("/tests/_stats", params={"clinic_id": "C1"}).json["total"] == 5
    # The old records, in their old order, now filterable and paged.
    assert ids(client.simulate_get("/tests", params={"clinic_id": "C1", "limit": "1000"})) == [r["test_id"] for r in old]
    assert ids(client.simulate_get("/tests", params={"clinic_id": "C1", "patient_id": "P1"})) == ["v1-1", "v1-3"]
    first = client.simulate_get("/tests", params={"clinic_id": "C1", "status": "final", "limit": "2"})
    parts = urlsplit(next_url(first))
    assert ids(first) + ids(client.simulate_get(parts.path, query_string=parts.query)) == ["v1-0", "v1-2", "v1-4"]


def test_migrating_twice_changes_nothing(tmp_path):
    path = tmp_path / "twice.db"
    version_1_database(path, [make("a")])
    conn = sqlite3.connect(path, isolation_level=None)
    migrations.migrate(conn)
    secret = conn.execute("SELECT value FROM meta").fetchall()
    migrations.migrate(conn)
    assert conn.execute("SELECT value FROM meta").fetchall() == secret
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.SCHEMA_VERSION


def schema_of(conn: sqlite3.Connection) -> dict:
    """What a database's schema is, independent of how its statements were spelled: each table's
    columns (name, type, not null, default, primary key place) and whether it is WITHOUT ROWID,
    each index's table, columns and uniqueness, each trigger's SQL with whitespace collapsed."""
    shape = {}
    for kind, name, table, sql in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"
                                               " WHERE name NOT LIKE 'sqlite_%'"):
        if kind == "table":
            shape[name] = ([tuple(col[1:]) for col in conn.execute(f"PRAGMA table_xinfo({name})")],
                           "WITHOUT ROWID" in sql.upper())
        elif kind == "index":
            unique = [row[2] for row in conn.execute(f"PRAGMA index_list({table})") if row[1] == name][0]
            shape[name] = (table, [row[2] for row in conn.execute(f"PRAGMA index_info({name})")], unique)
        else:
            shape[name] = " ".join(sql.split())
    return shape


def test_every_older_schema_migrates_to_exactly_the_current_schema(tmp_path):
    fresh = database_at(tmp_path / "fresh.db", migrations.SCHEMA_VERSION)
    expected = schema_of(fresh)
    assert "records" in expected and fresh.execute("PRAGMA user_version").fetchone()[0] == migrations.SCHEMA_VERSION
    for version in range(1, migrations.SCHEMA_VERSION):
        conn = database_at(tmp_path / f"v{version}.db", version)
        migrations.migrate(conn)
        assert schema_of(conn) == expected, f"from schema {version}"
        conn.close()


def _masters_with_open(servers, db, deadline_s: float = 20) -> None:
    """Wait until every server's master process has the database file open (it is migrating)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        opened = 0
        for server in servers:
            try:
                pid = server.proc.pid
                opened += str(db) in [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            except (OSError, AttributeError):
                pass
        if opened == len(servers):
            return
        time.sleep(0.02)
    raise AssertionError(f"not every gunicorn master opened {db} within {deadline_s}s")


def test_several_servers_starting_at_once_on_an_old_database_migrate_it_once_before_their_workers(
        start_server, tmp_path):
    db = tmp_path / "old.db"
    version_1_database(db, seeded=20_000)
    # Hold the write lock while three servers start, so each master is inside migrate(),
    # waiting, when it is let go: then they race for it. Workers start only after it.
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with ThreadPoolExecutor(3) as pool:
        starting = [pool.submit(start_server, workers=2, db_path=db, RECORDS_BUSY_TIMEOUT_MS=30000) for _ in range(3)]
        while len(start_server.servers) < 3 or any(s.proc is None for s in start_server.servers):
            time.sleep(0.01)
        _masters_with_open(start_server.servers, db)
        assert all(not s.worker_pids() for s in start_server.servers)  # no worker while migrating
        blocker.execute("ROLLBACK")
        blocker.close()
        servers = [started.result(60) for started in starting]

    lines = [line for server in servers for line in server.log_lines()]
    migrated = [line for line in lines if line["message"] == "schema migrated"]
    assert sorted(line["schema_version"] for line in migrated) == sorted(v for v in migrations.MIGRATIONS if v > 1)
    assert not [line for line in lines if line["level"] in ("ERROR", "CRITICAL")], [s.output() for s in servers]
    server = servers[0]
    resp = server.request("GET", "/tests?clinic_id=C0001&limit=5")
    assert resp.status == 200 and len(resp.json()) == 5

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM meta WHERE key = 'cursor_secret'").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 20_000
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # Whichever worker answers, it signs and checks cursors with the same key.
    pages = [server.request("GET", "/tests?clinic_id=C0002&limit=3") for _ in range(12)]
    links = {page.headers["link"] for page in pages}
    assert len(links) == 1
    path = links.pop()[1:].split(">", 1)[0]
    assert {server.request("GET", path).status for _ in range(12)} == {200}


def postgres_schema_of(url: str) -> dict:
    """What a PostgreSQL schema is, whatever the name of the namespace holding it: each table's
    columns, each index's and constraint's definition, each trigger's and function's text."""
    db = RawDatabase("", url)
    try:
        namespace = db.execute("SELECT current_schema()")[0][0]
        queries = {
            "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default, collation_name"
                       " FROM information_schema.columns WHERE table_schema = current_schema() ORDER BY 1, 2",
            "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() ORDER BY 1",
            "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
                           " WHERE connamespace = current_schema()::regnamespace ORDER BY 1, 2",
            "triggers": "SELECT tgname, pg_get_triggerdef(t.oid) FROM pg_trigger AS t JOIN pg_class AS c"
                        " ON c.oid = t.tgrelid WHERE c.relnamespace = current_schema()::regnamespace"
                        " AND NOT t.tgisinternal ORDER BY 1",
            "functions": "SELECT proname, prosrc FROM pg_proc WHERE pronamespace = current_schema()::regnamespace"
                         " ORDER BY 1",
        }
        return {kind: [tuple(str(value).replace(f"{namespace}.", "") for value in row) for row in db.execute(sql)]
                for kind, sql in queries.items()}
    finally:
        db.close()


@pytest.mark.parametrize("engine", ["postgresql"])
def test_a_postgresql_database_of_schema_1_migrates_to_exactly_the_current_schema(settings, postgres):
    old = RawDatabase("", settings.database_url)
    old.conn.execute((Path(__file__).parent / "postgres_schema_1.sql").read_text())
    old.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL"
                " DEFAULT now())")
    old.execute("INSERT INTO schema_migrations (version) VALUES (1)")
    # Records as schema 1's code left them, with seqs ahead of any clock, so the next insert's
    # seq shows which last seq it read.
    far = 9_000_000_000_000_000
    for n, (clinic_id, seq) in enumerate([("C1", far), ("C1", far + 7), ("C2", far + 3)]):
        row = prepare(make(f"old-{n}", clinic_id=clinic_id), "req-v1", "2025-05-31T00:00:00.000Z")
        old.execute("INSERT INTO records (clinic_id, seq, test_id, patient_id, test_type, status, collected_at,"
                    " version, request_id, doc) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?)",
                    (clinic_id, seq, row.test_id, row.patient_id, row.test_type, row.status, row.collected_key,
                     row.request_id, row.doc))
    for statement in postgres_counters.RECOUNT:
        old.conn.execute(statement)
    old.close()

    store = open_store(settings)
    assert store.migrate() == postgres_migrations.SCHEMA_VERSION
    fresh_url = postgres.new_database()
    fresh = open_store(Settings(database_url=fresh_url))
    fresh.migrate()
    fresh.close()
    assert postgres_schema_of(settings.database_url) == postgres_schema_of(fresh_url)

    db = RawDatabase("", settings.database_url)
    assert db.execute("SELECT clinic_id, last_seq FROM clinic_seq ORDER BY 1") == [("C1", far + 7), ("C2", far + 3)]
    store.insert(make("new-1", clinic_id="C1"), request_id="req-v2", now="2025-06-01T00:00:00.000Z")
    assert db.execute("SELECT seq FROM records WHERE test_id = 'new-1'") == [(far + 8,)]
    assert set(store.check()["counter_mismatches"].values()) == {0}
    db.close()
    store.close()
