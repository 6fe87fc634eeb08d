"""What only the PostgreSQL engine has to prove: it is optional, it migrates once however many
hosts start at once, its faults answer as the contract says and heal by themselves, `copy` moves
a SQLite database into it whole, and `check`/`backup` work on it. Everything else it shares
with SQLite is proven by the tests marked `both_engines`."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import falcon.testing
import pytest

from records_service import keys as api_keys
from records_service.app import create_app
from records_service.config import Settings
from records_service.seed import clinic_ids, seed_rows
from records_service.store import open_store
from records_service.store.postgres.migrations import MIGRATION_LOCK, SCHEMA_VERSION
from tests.live import REPO, PostgresCluster, RawDatabase, admin, run_cli, writes_held
from tests.test_gunicorn import make_record, wait_for_log

NOW = "2025-06-01T12:00:00.000Z"


def test_a_sqlite_install_never_imports_psycopg(tmp_path):
    script = (
        "import json, sys, falcon.testing\n"
        "from records_service.app import create_app\n"
        "from records_service.config import Settings\n"
        f"app = create_app(Settings(db_path={str(tmp_path / 'r.db')!r}, auth='disabled'))\n"
        "client = falcon.testing.TestClient(app)\n"
        "record = {'test_id': 'T1', 'clinic_id': 'C1', 'patient_id': 'P1', 'test_type': 'CBC', 'result': 1,"
        " 'collected_at': '2025-05-01T10:00:00Z'}\n"
        "assert client.simulate_post('/tests', json=record).status_code == 201\n"
        "assert client.simulate_get('/ready').status_code == 200\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('psycopg'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("engine", ["postgresql"])
def test_ready_on_postgresql_says_so_without_a_journal_mode(settings, clock):
    client = falcon.testing.TestClient(create_app(settings, clock=clock))
    body = client.simulate_get("/ready").json
    assert (body["status"], body["engine"], body["schema_version"]) == ("ready", "postgresql", SCHEMA_VERSION)
    assert "journal_mode" not in body


@pytest.mark.parametrize("engine", ["postgresql"])
def test_hosts_starting_at_once_migrate_once(settings):
    starters = 6
    script = ("import sys, logging\n"
              "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
              "from records_service.config import Settings\n"
              "from records_service.store import open_store\n"
              "store = open_store(Settings(database_url=sys.argv[1]))\n"
              "print(store.migrate())\n")
    # Hold the migration lock until every starter has looked, found no schema, and waits for it.
    holder = RawDatabase("", settings.database_url)
    holder.execute("SELECT pg_advisory_lock(?)", (MIGRATION_LOCK,))
    procs = [subprocess.Popen([sys.executable, "-c", script, settings.database_url], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(starters)]
    deadline = time.monotonic() + 30
    while holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")[0][0] < starters:
        assert time.monotonic() < deadline and all(proc.poll() is None for proc in procs), "the starters did not wait"
        time.sleep(0.05)
    holder.execute("SELECT pg_advisory_unlock(?)", (MIGRATION_LOCK,))
    holder.close()
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * starters, outputs
    assert [out.strip() for out, _ in outputs] == [str(SCHEMA_VERSION)] * starters
    assert sum(err.count("schema created") for _, err in outputs) == 1
    db = RawDatabase("", settings.database_url)
    assert db.execute("SELECT version FROM schema_migrations") == [(SCHEMA_VERSION,)]
    db.close()


@pytest.mark.parametrize("engine", ["postgresql"])
def test_a_connection_killed_mid_request_is_503_with_retry_after_and_the_next_request_is_served(
        start_server, postgres):
    server = start_server(workers=1, RECORDS_LOG_LEVEL="DEBUG", RECORDS_BUSY_TIMEOUT_MS=20000)
    assert server.request("POST", "/tests", make_record("before")).status == 201
    answer = {}
    with writes_held(server):
        poster = threading.Thread(target=lambda: answer.update(resp=server.request(
            "POST", "/tests", make_record("killed"), {"X-Request-ID": "killed-1"})))
        poster.start()
        wait_for_log(server, lambda l: l.get("request_id") == "killed-1" and l["message"] == "request received")
        time.sleep(0.3)  # in its transaction, waiting for the lock
        killed = admin(postgres.url(), "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                       " WHERE application_name = 'records_service'")
        poster.join(10)
    assert killed[0][0] >= 1
    resp = answer["resp"]
    assert resp.status == 503 and int(resp.headers["retry-after"]) >= 1
    assert resp.json()["request_id"] == "killed-1"
    # Every connection of the worker was killed; it serves the next requests on new ones.
    assert server.request("GET", "/ready").status == 200
    assert server.request("POST", "/tests", make_record("after")).status == 201
    assert [r["test_id"] for r in server.walk("/tests?clinic_id=C001")] == ["before", "after"]
    assert '"status": 500' not in server.output()


@pytest.fixture
def own_cluster():
    """A cluster of this test's own, to stop and start (the session's serves every other test)."""
    cluster = PostgresCluster().start()
    yield cluster
    cluster.destroy()


def test_while_postgresql_is_down_writes_and_ready_are_503_and_service_resumes_when_it_is_back(
        start_server, own_cluster, tmp_path):
    url = own_cluster.new_database()
    server = start_server(workers=2, RECORDS_DATABASE_URL=url)
    assert server.request("POST", "/tests", make_record("before")).status == 201
    own_cluster.stop()

    for method, path, body in [("POST", "/tests", make_record("while-down")), ("GET", "/tests?clinic_id=C001", None),
                               ("GET", "/ready", None)]:
        started = time.monotonic()
        resp = server.request(method, path, body, timeout=15)
        assert time.monotonic() - started < 5, f"{method} {path} took too long"
        assert resp.status == 503, (method, path, resp.body)
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.headers["content-type"] == "application/problem+json"
    assert server.request("GET", "/health").status == 200

    own_cluster.start_server()
    deadline = time.monotonic() + 15
    while server.request("GET", "/ready").status != 200:
        assert time.monotonic() < deadline, "not ready again within 15 s"
        time.sleep(0.1)
    assert server.request("POST", "/tests", make_record("after")).status == 201
    assert [r["test_id"] for r in server.walk("/tests?clinic_id=C001")] == ["before", "after"]
    assert '"status": 500' not in server.output()


def test_a_database_that_is_not_there_at_start_is_503_until_it_is(start_server, tmp_path):
    silent = PostgresCluster()  # its port: nothing listens there
    server = start_server(workers=1, RECORDS_DATABASE_URL=silent.url())
    resp = server.request("POST", "/tests", make_record("x"))
    assert resp.status == 503 and resp.headers["retry-after"]
    assert server.request("GET", "/ready").status == 503


@pytest.mark.parametrize("engine", ["postgresql"])
def test_export_reads_through_a_server_side_cursor_a_chunk_at_a_time(start_server, settings, postgres):
    store = open_store(settings)
    for _ in store.bulk_insert(seed_rows(30_000, 1, datetime(2025, 6, 1, tzinfo=timezone.utc), rng_seed=3)):
        pass
    store.close()
    clinic = clinic_ids(1)[0]
    server = start_server(workers=1)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", f"/tests/_export?clinic_id={clinic}")
    resp = conn.getresponse()
    head = resp.read(1000)  # then stop reading: the worker blocks with its socket full, mid-export
    time.sleep(1)
    fetching = admin(postgres.url(), "SELECT query, state FROM pg_stat_activity WHERE application_name = 'records_service'"
                                     " AND query LIKE 'FETCH FORWARD%'")
    rest = resp.read()
    conn.close()
    assert fetching and fetching[0][1] == "idle in transaction", fetching
    assert (head + rest).count(b"\n") == 30_000


@pytest.mark.parametrize("engine", ["postgresql"])
def test_check_and_backup_on_postgresql(settings, client, record, tmp_path):
    assert client.simulate_post("/tests", json=record).status_code == 201
    checked = run_cli(tmp_path / "unused.db", "check", database_url=settings.database_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"integrity ok, schema version {SCHEMA_VERSION}, 1 records" in checked.stdout
    assert "problem" not in checked.stdout

    backup = run_cli(tmp_path / "unused.db", "backup", str(tmp_path / "copy.db"), database_url=settings.database_url)
    assert backup.returncode == 1
    assert backup.stderr.count("\n") == 1 and "pg_dump" in backup.stderr
    assert not (tmp_path / "copy.db").exists()


@pytest.mark.parametrize("engine", ["postgresql"])
def test_check_counts_counter_rows_that_disagree_with_the_records(settings, client, record, tmp_path):
    assert client.simulate_post("/tests", json=record).status_code == 201
    db = RawDatabase("", settings.database_url)
    db.execute("UPDATE clinic_counts SET records = records + 1")
    db.close()
    checked = run_cli(tmp_path / "unused.db", "check", database_url=settings.database_url)
    assert checked.returncode == 1
    assert "problem: clinic_counts: 2 counter rows disagree with the records" in checked.stdout


class TestCopy:
    @pytest.fixture
    def sqlite_app(self, tmp_path, clock):
        """A SQLite database with records of two clinics, corrections, a void, and keys."""
        settings = Settings(db_path=str(tmp_path / "records.db"), auth="disabled")
        client = falcon.testing.TestClient(create_app(settings, clock=clock))
        for n in range(25):
            record = make_record(f"T{n:02d}", clinic_id=f"C{n % 2}", collected_at=f"2025-05-{n + 1:02d}T10:00:00Z")
            assert client.simulate_post("/tests", json=record).status_code == 201
        assert client.simulate_put("/tests/T03", json=make_record("T03", clinic_id="C1", status="corrected",
                                                                  collected_at="2025-05-04T10:00:00Z", result=9.9),
                                   headers={"If-Match": '"1"', "X-Request-ID": "req-fix"}).status_code == 200
        assert client.simulate_delete("/tests/T04", headers={"If-Match": '"1"'}).status_code == 200
        store = open_store(settings)
        api_keys.create_key(store, name="lab A", roles=["read"], clinics=["C0"], now=NOW)
        store.close()
        return settings, client

    def answers(self, client) -> dict:
        """What clients see of the database: lists, pages, histories, audit, stats."""
        first = client.simulate_get("/tests", params={"clinic_id": "C0", "limit": "5"})
        return {
            "lists": [client.simulate_get("/tests", params={"clinic_id": c, "limit": "1000"}).json for c in ("C0", "C1")],
            "next": first.headers["link"],
            "histories": [client.simulate_get(f"/tests/T{n:02d}/history").json for n in range(25)],
            "audit": client.simulate_get("/audit/req-fix").json,
            "stats": [client.simulate_get("/tests/_stats", params={"clinic_id": c}).json for c in ("C0", "C1")],
        }

    @pytest.mark.parametrize("engine", ["postgresql"])
    def test_copy_moves_records_history_keys_and_cursors_into_postgresql(self, sqlite_app, settings, clock, tmp_path):
        sqlite_settings, sqlite_client = sqlite_app
        copied = run_cli(tmp_path / "records.db", "copy", "--to", settings.database_url)
        assert copied.returncode == 0, copied.stderr
        assert "copied 25 records, 2 superseded versions and 1 keys" in copied.stdout

        pg_client = falcon.testing.TestClient(create_app(settings, clock=clock))
        assert self.answers(pg_client) == self.answers(sqlite_client)
        # A cursor handed out by the SQLite service goes on working after the move.
        cursor_link = sqlite_client.simulate_get("/tests", params={"clinic_id": "C0", "limit": "5"}).headers["link"]
        path = cursor_link[1:cursor_link.index(">")]
        assert pg_client.simulate_get(path.split("?")[0], query_string=path.split("?")[1]).status_code == 200
        assert [k["name"] for k in open_store(settings).list_keys()] == ["lab A"]
        assert run_cli(tmp_path / "unused.db", "check", database_url=settings.database_url).returncode == 0

        again = run_cli(tmp_path / "records.db", "copy", "--to", settings.database_url)
        assert again.returncode == 1 and "already holds records" in again.stderr

    def test_copy_refuses_a_url_that_is_not_postgresql(self, sqlite_app, tmp_path):
        out = run_cli(tmp_path / "records.db", "copy", "--to", "mysql://db/records")
        assert out.returncode == 2 and "--to must be a postgresql://" in out.stderr
