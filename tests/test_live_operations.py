"""Operations against real gunicorn: readiness under a held lock, state all workers share, backup under load."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tests.live import REPO, Writers
from tests.test_gunicorn import make_record


def test_ready_is_503_within_the_bound_while_the_database_is_locked(start_server):
    bound_ms = 500
    server = start_server(workers=2, RECORDS_BUSY_TIMEOUT_MS=bound_ms)
    assert server.request("GET", "/ready").status == 200
    blocker = sqlite3.connect(server.db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        resp = server.request("GET", "/ready", timeout=10)
        elapsed = time.monotonic() - started
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert resp.status == 503 and resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["reason"] == "busy" and int(resp.headers["retry-after"]) >= 1
    assert bound_ms / 1000 * 0.9 <= elapsed < bound_ms / 1000 + 3, f"answered after {elapsed:.2f}s"
    assert server.request("GET", "/ready").status == 200


def test_every_worker_shows_the_same_start_and_the_failures_any_worker_recorded(start_server):
    server = start_server(workers=3, RECORDS_BUSY_TIMEOUT_MS=300)
    blocker = sqlite3.connect(server.db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        failed = server.request("POST", "/tests", make_record("blocked"), {"X-Request-ID": "failed-while-locked"})
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert failed.status == 503

    pages: dict[str, str] = {}  # worker pid -> its dashboard
    deadline = time.monotonic() + 20
    with ThreadPoolExecutor(max_workers=6) as pool:
        while len(pages) < 3 and time.monotonic() < deadline:
            for resp in pool.map(lambda _: server.request("GET", "/"), range(12)):
                assert resp.status == 200
                page = resp.body.decode()
                pages[re.search(r"\(worker (\d+)\)", page).group(1)] = page
    assert len(pages) >= 2, "every dashboard came from one worker"
    assert all("failed-while-locked" in page for page in pages.values())
    started = {re.search(r'id="started-at" datetime="([^"]+)"', page).group(1) for page in pages.values()}
    assert len(started) == 1, started


def test_a_backup_taken_under_write_load_holds_every_record_acknowledged_before_it(start_server, tmp_path):
    server = start_server(workers=3)
    dest = tmp_path / "backup.db"
    with Writers(server, make_record, prefix="b", threads=6) as writers:
        writers.wait_for(300)
        before = set(writers.acknowledged)
        out = subprocess.run([sys.executable, "-m", "records_service", "backup", str(dest)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(REPO), "RECORDS_DB_PATH": str(server.db_path)})
        during = len(writers.acknowledged)
    acknowledged = set(writers.acknowledged)
    assert out.returncode == 0, out.stderr
    assert during > len(before), "no write was acknowledged while the backup ran"

    restored = tmp_path / "restored" / "records.db"
    restored.parent.mkdir()
    shutil.copy(dest, restored)
    conn = sqlite3.connect(restored)
    in_copy = {row[0] for row in conn.execute("SELECT test_id FROM records")}
    conn.close()
    assert before <= in_copy, f"{len(before - in_copy)} acknowledged records missing from the backup"
    assert in_copy <= acknowledged, "the backup holds records that were never acknowledged"

    served = start_server(workers=1, db_path=restored)
    assert served.request("GET", "/ready").status == 200
    page = served.request("GET", "/").body.decode()
    assert re.search(r'id="records"><div class="label">Records</div><div class="value">([0-9,]+)<', page).group(1) \
        == f"{len(in_copy):,}"
    check = subprocess.run([sys.executable, "-m", "records_service", "check", str(restored)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert check.returncode == 0, check.stdout + check.stderr
