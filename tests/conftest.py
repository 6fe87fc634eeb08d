from __future__ import annotations

from datetime import datetime, timezone

import falcon.testing
import pytest

from records_service.app import create_app
from records_service.config import Settings
from tests.live import Nginx, Server


class Clock:
    """A settable clock, injected into the app in place of the real one."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=timezone.utc))


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(db_path=str(tmp_path / "records.db"), auth="disabled")


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
def start_server(tmp_path):
    """Start real gunicorn instances for a test; every one is stopped afterwards."""
    servers: list[Server] = []

    def start(workers: int = 3, db_path=None, **env) -> Server:
        server = Server(db_path=db_path or tmp_path / "records.db", log_path=tmp_path / f"gunicorn-{len(servers)}.log",
                        workers=workers, env={k: str(v) for k, v in env.items()})
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
