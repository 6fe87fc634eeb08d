"""A full disk and a read-only database: 503 with Retry-After (never a 500), /ready 503, the log naming
the real cause, nothing acknowledged lost, and writes back without a restart once it is over."""

from __future__ import annotations

import os
import subprocess
import sys

import falcon.testing
import pytest

from records_service.app import create_app
from records_service.config import Settings

from tests.live import REPO


def make_record(test_id: str) -> dict:
    return {"test_id": test_id, "clinic_id": "C001", "patient_id": "P1", "test_type": "CBC",
            "result": "x" * 1000, "notes": "n" * 1900, "collected_at": "2025-05-01T10:00:00Z"}


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs of the test's own (the test runs as root, as CI does)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_503_and_ready_says_so_and_writes_resume_once_space_is_back(start_server, small_disk):
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (2 << 20))  # freed later: the space that comes back
    server = start_server(workers=1, db_path=small_disk / "records.db")
    acknowledged, refused = [], []
    for n in range(3000):
        resp = server.request("POST", "/tests", make_record(f"t{n}"))
        if resp.status == 201:
            acknowledged.append(f"t{n}")
            continue
        assert resp.status == 503, resp.body
        assert resp.headers["retry-after"] and resp.json()["type"].endswith(("storage-full", "busy"))
        refused.append(resp.json()["type"])
        if len(refused) >= 5:
            break
    assert len(refused) >= 5 and acknowledged, "the disk never filled"
    ready = server.request("GET", "/ready")
    assert ready.status == 503 and ready.json()["reason"] == "storage-full", ready.body
    errors = [line.get("message", "") for line in server.log_lines() if line["level"] == "ERROR"]
    assert any("database or disk is full" in message for message in errors), errors
    assert not any("no transaction is active" in message for message in errors), errors

    ballast.unlink()
    assert server.request("GET", "/ready").status == 200
    assert server.request("POST", "/tests", make_record("after")).status == 201
    listed = []
    path = "/tests?clinic_id=C001&limit=1000"
    listed = {record["test_id"] for record in server.walk(path)}
    assert set(acknowledged) | {"after"} <= listed


def test_a_read_only_database_is_503_for_writes_and_ready_and_still_serves_reads(tmp_path, clock, caplog):
    # The probe used a chmod 444 file as a non-root user; the test runs as root, which file modes
    # do not stop, so the file is made immutable (chattr +i, which binds root too): SQLite then
    # opens it read-only and meets the same refusal.
    db = tmp_path / "records.db"
    subprocess.run([sys.executable, "-m", "records_service", "seed", "--records", "3", "--clinics", "1"],
                   env={**os.environ, "RECORDS_DB_PATH": str(db), "PYTHONPATH": str(REPO)}, check=True,
                   capture_output=True)
    subprocess.run(["chattr", "+i", str(db)], check=True)
    try:
        client = falcon.testing.TestClient(create_app(Settings(db_path=str(db), auth="disabled"), clock=clock))
        resp = client.simulate_post("/tests", json={**make_record("ro-1"), "clinic_id": "C0001"})
        assert resp.status_code == 503 and resp.json["type"].endswith("read-only"), resp.json
        assert resp.headers["retry-after"]
        ready = client.simulate_get("/ready")
        assert ready.status_code == 503 and ready.json["reason"] == "read-only", ready.json
        assert len(client.simulate_get("/tests", params={"clinic_id": "C0001"}).json) == 3
        assert any("readonly database" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)
