"""Migration 2 (indexes for filters and paging, the cursor key) from a database made by schema 1."""

from __future__ import annotations

import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from urllib.parse import urlsplit

import falcon.testing

from records_service import store as store_module
from records_service.app import create_app
from records_service.seed import seed_rows
from tests.test_listing import ids, make, next_url

NOW = datetime(2025, 6, 1, tzinfo=timezone.utc)


def version_1_database(path, records: list[dict] = (), seeded: int = 0) -> None:
    """A database exactly as schema 1 left it, holding `records` then `seeded` synthetic ones."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    store_module.migrate(conn, upto=1)
    # Schema-1 code inserted the rows alone (the INSERT is the same); there were no counts yet.
    rows = [store_module._row({"unit": None, "notes": None, **record}, "req-v1", "2025-05-31T00:00:00.000Z")
            for record in records]
    conn.execute("BEGIN")
    conn.executemany(store_module._INSERT_SQL, rows + list(seed_rows(seeded, 10, NOW, rng_seed=2)))
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
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION
    assert len(conn.execute("SELECT value FROM meta WHERE key = 'cursor_secret'").fetchone()[0]) == 32
    found = indexes(settings.db_path)
    assert "(clinic_id, seq, status, test_type, collected_at, doc)" in found["records_by_clinic"]
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
    store_module.migrate(conn)
    secret = conn.execute("SELECT value FROM meta").fetchall()
    store_module.migrate(conn)
    assert conn.execute("SELECT value FROM meta").fetchall() == secret
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION


def _workers_with_open(server, db, count: int, deadline_s: float = 20) -> list[int]:
    """Wait until `count` workers of `server` have the database file open; their pids."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        holding = []
        for pid in server.worker_pids():
            try:
                fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            except OSError:  # a worker still starting, or gone
                continue
            if str(db) in fds:
                holding.append(pid)
        if len(holding) >= count:
            return holding
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} workers opened {db} within {deadline_s}s")


def test_several_workers_starting_at_once_on_an_old_database_migrate_it_once(start_server, tmp_path):
    db = tmp_path / "old.db"
    version_1_database(db, seeded=20_000)
    # Hold the write lock while the workers start, so all four are inside migrate(), waiting,
    # when it is let go: then they race for it.
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(start_server, workers=4, db_path=db, RECORDS_BUSY_TIMEOUT_MS=30000)
        while not start_server.servers or start_server.servers[0].proc is None:
            time.sleep(0.01)
        waiting = _workers_with_open(start_server.servers[0], db, 4)
        blocker.execute("ROLLBACK")
        blocker.close()
        server = starting.result(60)

    # Each worker says once whether its database is ready; wait until all four have spoken.
    deadline = time.monotonic() + 30
    while True:
        lines = server.log_lines()
        opened = [line for line in lines if line["message"] == "database ready" or line["level"] == "ERROR"]
        if len(opened) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [line["message"] for line in opened] == ["database ready"] * 4, server.output()
    migrated = [line for line in lines if line["message"] == "schema migrated"]
    assert [line["schema_version"] for line in migrated] == sorted(v for v in store_module.MIGRATIONS if v > 1)  # once, by one of them
    assert not [line for line in lines if line["level"] in ("ERROR", "CRITICAL")], server.output()
    assert sorted(server.worker_pids()) == sorted(waiting)  # every worker came up and stayed up
    resp = server.request("GET", "/tests?clinic_id=C0001&limit=5")
    assert resp.status == 200 and len(resp.json()) == 5

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM meta").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 20_000
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # Whichever worker answers, it signs and checks cursors with the same key.
    pages = [server.request("GET", "/tests?clinic_id=C0002&limit=3") for _ in range(12)]
    links = {page.headers["link"] for page in pages}
    assert len(links) == 1
    path = links.pop()[1:].split(">", 1)[0]
    assert {server.request("GET", path).status for _ in range(12)} == {200}
