from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone

import falcon.testing
import pytest

from records_service.app import create_app
from records_service.config import Settings
from records_service.logs import JsonFormatter
from tests.live import ExistingPostgres, Nginx, PostgresCluster, RawDatabase, Server


class Clock:
    """A settable clock, injected into the app in place of the real one."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=timezone.utc))


ENGINES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc):
    """`@pytest.mark.both_engines` (on a test, class or module) runs each test that uses the
    engine once per engine; tests of the module that touch no store run once."""
    if metafunc.definition.get_closest_marker("both_engines") and "engine" in metafunc.fixturenames:
        metafunc.parametrize("engine", ENGINES)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the tests: RECORDS_TEST_DATABASE_URL's, or a throwaway cluster
    started now (and torn down after the session). Started only if a test needs it."""
    url = os.environ.get("RECORDS_TEST_DATABASE_URL")
    if url:
        yield ExistingPostgres(url)
        return
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def engine() -> str:
    """The storage engine of the test: SQLite, unless the test is marked `both_engines` (or
    parametrises `engine` itself); every fixture below follows it."""
    return "sqlite"


@pytest.fixture
def database_url(engine, request) -> str | None:
    """A new, empty PostgreSQL database for a PostgreSQL test; None on SQLite."""
    if engine == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def settings(tmp_path, database_url) -> Settings:
    return Settings(db_path=str(tmp_path / "records.db"), auth="disabled", database_url=database_url)


@pytest.fixture
def raw_db(settings, client):
    """Plain SQL on the test's database (created by the app first), for tests of what the
    database itself enforces."""
    db = RawDatabase(settings.db_path, settings.database_url)
    yield db
    db.close()


@pytest.fixture
def client(settings, clock) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(settings, clock=clock))


@pytest.fixture
def record() -> dict:
    return {
        "test_id": "T-0001", "clinic_id": "C001", "patient_id": "P-42", "test_type": "HbA1c",
        "result": 5.4, "unit": "%", "status": "final", "collected_at": "2025-05-01T10:00:00+05:30",
        "notes": "fasting sample",
    }


@pytest.fixture
def start_server(tmp_path, database_url):
    """Start real gunicorn instances for a test, on the test's engine; every one is stopped afterwards."""
    servers: list[Server] = []

    def start(workers: int = 3, db_path=None, **env) -> Server:
        server = Server(db_path=db_path or tmp_path / "records.db", log_path=tmp_path / f"gunicorn-{len(servers)}.log",
                        workers=workers, env={k: str(v) for k, v in env.items()}, database_url=database_url)
        servers.append(server)
        return server.start()

    start.servers = servers
    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def start_nginx(tmp_path):
    """Start Debian's nginx with deploy/nginx.conf in front of upstreams ("host:port" each);
    every one is stopped afterwards."""
    proxies: list[Nginx] = []

    def start(upstreams: list[str], **overrides: str) -> Nginx:
        proxy = Nginx(tmp_path / f"nginx-{len(proxies)}", upstreams, overrides)
        proxies.append(proxy)
        return proxy.start()

    yield start
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def log_lines() -> list[dict]:
    """Every log line, as the JSON the service writes, formatted while its request is served."""
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(self.format(record)))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lines
    root.removeHandler(handler)
    root.setLevel(level)
