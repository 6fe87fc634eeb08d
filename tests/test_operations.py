"""/ready, /openapi.json and the dashboard through the real app factory, with a temporary database."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import falcon.testing
import pytest

from records_service import __version__, dashboard
from records_service.store.postgres.migrations import SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION
from records_service.store.sqlite.migrations import SCHEMA_VERSION
from records_service.app import create_app
from records_service.config import Settings
from tests.live import REPO
from tests.test_api import assert_problem, post


class Elements(HTMLParser):
    """Every start tag of a page as (tag, attributes), and the page's text."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def bars(page: str) -> dict[str, int]:
    return {a["data-hour"]: int(a["data-count"]) for a in Elements(page).find("rect", **{"class": "bar"})}


# -- /ready ----------------------------------------------------------------------------------

def test_ready_reports_the_database_state(client):
    resp = client.simulate_get("/ready")
    assert resp.status_code == 200
    assert resp.json == {"status": "ready", "version": __version__, "engine": "sqlite", "journal_mode": "wal",
                         "schema_version": SCHEMA_VERSION}


def assert_not_ready(resp, reason: str) -> None:
    body = assert_problem(resp, 503)
    assert body["reason"] == reason and body["type"].endswith("not-ready")
    assert int(resp.headers["retry-after"]) >= 1


def test_ready_is_503_when_the_database_directory_is_missing(tmp_path):
    client = falcon.testing.TestClient(create_app(Settings(db_path=str(tmp_path / "missing" / "r.db"))))
    resp = client.simulate_get("/ready")
    assert_not_ready(resp, "unavailable")
    assert "missing" not in resp.text


def test_ready_is_503_when_the_file_is_not_a_database(tmp_path):
    path = tmp_path / "r.db"
    path.write_bytes(b"this is not an SQLite database, whatever its name says" * 100)
    client = falcon.testing.TestClient(create_app(Settings(db_path=str(path))))
    assert_not_ready(client.simulate_get("/ready"), "unavailable")
    assert path.read_bytes().startswith(b"this is not")  # and nothing overwrote it


@pytest.fixture(params=["absolute", "relative"], ids=["absolute path", "relative to a working directory"])
def data_dir_client(request, tmp_path, monkeypatch) -> tuple[Path, falcon.testing.TestClient]:
    """The app on a database in its own directory, named by an absolute path, or, as the README's
    default `records.db` is, relative to the working directory, which is then that directory."""
    data = tmp_path / "data"
    data.mkdir()
    db_path = str(data / "r.db")
    if request.param == "relative":
        monkeypatch.chdir(data)
        db_path = "r.db"
    return data, falcon.testing.TestClient(create_app(Settings(db_path=db_path, auth="disabled")))


def test_ready_is_503_when_the_directory_is_removed_under_the_running_app(data_dir_client, record):
    data, client = data_dir_client
    assert post(client, record).status_code == 201
    assert client.simulate_get("/ready").status_code == 200
    shutil.rmtree(data)
    assert_not_ready(client.simulate_get("/ready"), "unavailable")


def test_writes_stop_once_the_directory_is_removed_instead_of_going_into_the_unlinked_file(data_dir_client, record):
    data, client = data_dir_client
    assert post(client, record).status_code == 201
    shutil.rmtree(data)
    assert_problem(post(client, {**record, "test_id": "after"}), 503)
    assert_problem(client.simulate_get("/tests", params={"clinic_id": record["clinic_id"]}), 503)


_READY = """
import sys, falcon.testing
from records_service.app import create_app
from records_service.config import Settings
resp = falcon.testing.TestClient(create_app(Settings(db_path=sys.argv[1]))).simulate_get("/ready")
print(resp.status_code, resp.text)
"""


def test_ready_is_503_when_the_file_cannot_be_read(tmp_path, record):
    """The app runs in a subprocess; as root, without the capabilities that bypass file permissions."""
    path = tmp_path / "r.db"
    assert post(falcon.testing.TestClient(create_app(Settings(db_path=str(path), auth="disabled"))), record).status_code == 201
    for name in os.listdir(tmp_path):
        os.chmod(tmp_path / name, 0)
    without_override = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv (util-linux): file permissions cannot be enforced")
        caps = "-dac_override,-dac_read_search"
        without_override = ["setpriv", "--bounding-set", caps, "--inh-caps", caps]
    out = subprocess.run([*without_override, sys.executable, "-c", _READY, str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    status, _, body = out.stdout.partition(" ")
    assert status == "503", out.stdout + out.stderr
    assert json.loads(body)["reason"] == "unavailable"


# -- /openapi.json ---------------------------------------------------------------------------

def test_openapi_document_is_served_byte_for_byte(client):
    resp = client.simulate_get("/openapi.json")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert resp.content == (REPO / "records_service" / "openapi.json").read_bytes()
    assert resp.json["openapi"] == "3.1.0"


# -- the dashboard ---------------------------------------------------------------------------

def tile(page: str, name: str) -> str:
    match = re.search(rf'id="{name}"><div class="label">[^<]*</div><div class="value">([^<]*)</div>', page)
    assert match, f"no tile {name}"
    return match.group(1)


@pytest.mark.both_engines
def test_dashboard_shows_counts_per_clinic_and_per_hour(client, clock, record, engine):
    start = clock.now
    for n, (hours_ago, clinic) in enumerate([(0, "C001"), (0, "C001"), (1, "C002"), (30, "C001"), (200, "C003")]):
        clock.now = start - timedelta(hours=hours_ago)
        assert post(client, {**record, "test_id": f"T{n}", "clinic_id": clinic}).status_code == 201
    clock.now = start
    resp = client.simulate_get("/")
    assert resp.status_code == 200 and resp.headers["content-type"] == "text/html; charset=utf-8"
    # Hours older than 7 days are not drawn; the clinic totals count every record, largest first.
    assert bars(resp.text) == {"2025-06-01T12": 2, "2025-06-01T11": 1, "2025-05-31T06": 1}
    rows = [(a["data-clinic"], int(a["data-total"])) for a in Elements(resp.text).find("tr") if "data-clinic" in a]
    assert rows == [("C001", 3), ("C002", 1), ("C003", 1)]
    assert (tile(resp.text, "records"), tile(resp.text, "clinics")) == ("5", "3")
    if engine == "sqlite":
        assert tile(resp.text, "schema-version") == str(SCHEMA_VERSION)
        assert tile(resp.text, "journal-mode") == "wal"
        assert tile(resp.text, "database-size").endswith("KiB") and tile(resp.text, "wal-size").endswith("KiB")
    else:
        assert (tile(resp.text, "schema-version"), tile(resp.text, "journal-mode")) == (
            str(POSTGRES_SCHEMA_VERSION), "PostgreSQL WAL")
        assert tile(resp.text, "database-size").endswith("iB") and tile(resp.text, "wal-size").endswith("iB")


def test_dashboard_draws_nothing_for_an_empty_database_and_fetches_nothing(client):
    resp = client.simulate_get("/")
    assert resp.status_code == 200 and bars(resp.text) == {}
    page = Elements(resp.text)
    assert not page.find("script") and not page.find("img") and not page.find("link")
    assert "src=" not in resp.text and "url(" not in resp.text and "://" not in resp.text
    assert resp.headers["content-security-policy"].startswith("default-src 'none'")


def test_dashboard_lists_server_failures_and_still_renders_without_the_database(tmp_path, clock, record):
    """A failure recorded by one request is shown by another, even while the database is gone."""
    data = tmp_path / "data"
    data.mkdir()
    client = falcon.testing.TestClient(create_app(Settings(db_path=str(data / "r.db"), auth="disabled"), clock=clock))
    shutil.rmtree(data)
    failed = client.simulate_post("/tests", body=json.dumps(record), headers={
        "Content-Type": "application/json", "X-Request-ID": "fails-1"})
    assert failed.status_code == 503
    assert client.simulate_get("/nowhere", headers={"X-Request-ID": "client-error"}).status_code == 404
    resp = client.simulate_get("/")
    assert resp.status_code == 503 and resp.headers["content-type"] == "text/html; charset=utf-8"
    assert "cannot be opened or read" in resp.text
    assert "fails-1" in resp.text and "client-error" not in resp.text  # a 4xx is the client's failure
    assert tile(resp.text, "failures") == "1"


def test_dashboard_escapes_everything_it_did_not_write_itself(clock):
    view = dashboard.DashboardView(
        generated_at=clock.now, started_at=clock.now, uptime_s=5, pid=1, db_problem=None,
        db={"records": 1, "clinic_count": 1, "clinics": [("C<i>1", 1)], "hours": {}, "schema_version": 5,
            "journal_mode": "wal", "database_bytes": 4096, "wal_bytes": 0},
        failures_total=1, failures=[{"at": "x", "status": 500, "type": "internal", "method": "GET",
                                     "path": "/<script>alert(1)</script>", "request_id": "r\"1"}])
    page = dashboard.render(view)
    assert "<script" not in page and "<i>" not in page
    assert "&lt;script&gt;" in page and "C&lt;i&gt;1" in page


@pytest.mark.parametrize("path", ["/", "/ready", "/openapi.json"])
def test_operations_routes_carry_server_timing_and_the_request_id(client, path):
    resp = client.simulate_get(path, headers={"X-Request-ID": "timing-1"})
    assert resp.headers["server-timing"].startswith("app;dur=")
    assert resp.headers["x-request-id"] == "timing-1"


def test_a_503_from_ready_carries_server_timing(tmp_path):
    client = falcon.testing.TestClient(create_app(Settings(db_path=str(tmp_path / "missing" / "r.db"))))
    resp = client.simulate_get("/ready")
    assert resp.status_code == 503 and resp.headers["server-timing"].startswith("app;dur=")
