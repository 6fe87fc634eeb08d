"""The worker model (gunicorn.conf.py: threads, and a bound on how many may wait to write): reads
keep being answered while writes wait for the database, and a refused write hears so in time."""

from __future__ import annotations

import http.client
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.live import request, writes_held

BUSY_MS = 2000


def make_record(test_id: str) -> dict:
    return {"test_id": test_id, "clinic_id": "C001", "patient_id": "P1", "test_type": "CBC", "result": 1,
            "collected_at": "2025-05-01T10:00:00Z"}


@pytest.mark.both_engines
def test_reads_are_answered_within_a_second_while_more_writes_wait_than_there_are_threads(start_server):
    server = start_server(workers=2, RECORDS_BUSY_TIMEOUT_MS=BUSY_MS)
    assert server.request("POST", "/tests", make_record("before")).status == 201
    writes: list[tuple[int, float, str | None]] = []

    def write(n: int) -> None:
        started = time.monotonic()
        try:
            resp = request(server.port, "POST", "/tests", make_record(f"w{n}"), timeout=30)
            writes.append((resp.status, time.monotonic() - started, resp.headers.get("retry-after")))
        except (OSError, http.client.HTTPException) as exc:
            writes.append((0, time.monotonic() - started, repr(exc)))

    with writes_held(server):  # another program holds the write lock
        reads = []
        with ThreadPoolExecutor(max_workers=80) as pool:
            waiting = [pool.submit(write, n) for n in range(80)]  # 2 workers x 16 threads: far more than they have
            time.sleep(0.3)
            deadline = time.monotonic() + BUSY_MS / 1000
            while time.monotonic() < deadline:
                started = time.monotonic()
                resp = request(server.port, "GET", "/tests?clinic_id=C001", timeout=30)
                reads.append((resp.status, time.monotonic() - started))
                time.sleep(0.05)
            for future in waiting:
                future.result()

    assert reads and {status for status, _ in reads} == {200}
    assert max(took for _, took in reads) < 1.0, sorted(took for _, took in reads)[-5:]
    # Every write was refused while the lock was held: 503 with Retry-After, in time.
    assert {status for status, _, _ in writes} == {503}, writes
    assert all(retry_after for _, _, retry_after in writes)
    assert max(took for _, took, _ in writes) < BUSY_MS / 1000 + 0.5, sorted(took for _, took, _ in writes)[-5:]
    assert server.request("POST", "/tests", make_record("after")).status == 201
