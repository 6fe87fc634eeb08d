"""Claims about the collection at scale that need real gunicorn workers: paging under concurrent
ingest, and an export whose memory does not grow with the number of records."""

from __future__ import annotations

import http.client
import json
import re
import socket
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from records_service.seed import seed_rows
from records_service.store import open_store
from records_service.store.sqlite import SQLiteStore as Store
from tests.live import AnonPeak
from tests.test_export_stats import seeded_then_damaged
from tests.test_gunicorn import make_record

NDJSON = {"Content-Type": "application/x-ndjson"}


def post_batch(server, records) -> dict:
    resp = server.request("POST", "/tests/_batch", "\n".join(json.dumps(r) for r in records), NDJSON)
    assert resp.status == 200, resp.body
    return resp.json()


@pytest.mark.both_engines
def test_walking_next_links_while_another_thread_ingests_returns_every_earlier_record_once(start_server):
    server = start_server(workers=3)
    for batch in range(3):
        post_batch(server, [make_record(f"old-{batch}-{i:03d}", "C1") for i in range(1000)])
    before = [f"old-{batch}-{i:03d}" for batch in range(3) for i in range(1000)]

    stop = threading.Event()
    ingested: list[str] = []
    corrected: list[str] = []

    failures: list[BaseException] = []  # an assertion in the writer thread would not fail the test by itself

    def ingest() -> None:
        """New records for C1 and C2, and after each batch an earlier record corrected in place."""
        n = 0
        try:
            while not stop.is_set():
                batch = [make_record(f"new-{n}-{i}", clinic) for i, clinic in enumerate(["C1", "C2"] * 10)]
                post_batch(server, batch)
                ingested.extend(r["test_id"] for r in batch)
                old = before[n * 7 % len(before)]
                resp = server.request("PUT", f"/tests/{old}", make_record(old, "C1", status="corrected"),
                                      {"If-Match": '"1"'})
                assert resp.status == 200, resp.body
                corrected.append(old)
                n += 1
        except BaseException as exc:
            failures.append(exc)

    writer = threading.Thread(target=ingest)
    writer.start()
    try:
        seen = []
        path = "/tests?clinic_id=C1&limit=97"
        ingested_at_start = None
        while path:
            resp = server.request("GET", path)
            assert resp.status == 200, resp.body
            seen += [r["test_id"] for r in resp.json()]
            if ingested_at_start is None:
                ingested_at_start = len(ingested)
            match = re.fullmatch(r'<([^>]*)>; rel="next"', resp.headers.get("link", ""))
            path = match.group(1) if match else None
        ingested_during_walk = len(ingested) - ingested_at_start
    finally:
        stop.set()
        writer.join()

    assert failures == []
    assert ingested_during_walk > 0, "the writer did not overlap the walk"
    assert len(seen) == len(set(seen)), "a record came twice"
    assert seen[:len(before)] == before  # each earlier record once, in ingest order, first: corrected ones too
    assert corrected
    assert all(test_id.startswith("new-") for test_id in seen[len(before):])


def _export(server, query: str) -> tuple[int, int]:
    """Stream an export; (lines, bytes), checking every line ends in a newline and is a record."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("GET", "/tests/_export?" + query)
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Transfer-Encoding") == "chunked" and resp.getheader("Content-Length") is None
        count = size = 0
        tail = b""
        while chunk := resp.read(1 << 16):
            size += len(chunk)
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            if count == 0:
                assert json.loads(lines[0])["clinic_id"] == "C0001"
            count += len(lines)
        assert tail == b"", "the last line does not end in a newline"
        return count, size
    finally:
        conn.close()


def test_an_export_of_200000_records_runs_in_the_memory_of_one_of_20000(start_server, tmp_path):
    db = tmp_path / "big.db"
    now = datetime.now(timezone.utc)
    store = Store(str(db))
    for _ in store.bulk_insert(seed_rows(200_000, 1, now, rng_seed=4)):
        pass
    store.close()
    # A tenth of the year the seed spread collection times over: about 20,000 records.
    start = (now - timedelta(days=365)).strftime("%Y-%m-%dT%H:%M:%SZ")
    stop = (now - timedelta(days=365 - 36.5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    window = f"clinic_id=C0001&collected_from={start}&collected_to={stop}"
    conn = sqlite3.connect(db)
    small = conn.execute("SELECT count(*) FROM records WHERE collected_at < ?", (stop[:-1] + ".000000000Z",)).fetchone()[0]
    conn.close()
    assert 18_000 < small < 22_000

    server = start_server(workers=1, db_path=db)
    worker = server.worker_pids()[0]
    with AnonPeak(worker) as small_peak:
        assert _export(server, window)[0] == small
    with AnonPeak(worker) as large_peak:
        count, size = _export(server, "clinic_id=C0001")

    assert count == 200_000
    assert server.worker_pids() == [worker]
    # Ten times the records (here ~70 MB of NDJSON) and the worker's own memory stays put.
    growth_kib = large_peak.peak - small_peak.peak
    assert growth_kib < 4 * 1024, f"anonymous memory grew by {growth_kib} KiB while exporting {size:,} bytes"
    done = [line for line in server.log_lines() if line["message"] == "export completed"]
    assert [line["count"] for line in done] == [small, 200_000]
    assert all(line.get("request_id") for line in done)


@pytest.mark.both_engines
def test_a_client_that_hangs_up_mid_export_leaves_the_worker_serving(start_server, settings):
    store = open_store(settings)
    for _ in store.bulk_insert(seed_rows(40_000, 1, datetime.now(timezone.utc), rng_seed=5)):
        pass
    store.close()
    server = start_server(workers=1, db_path=settings.db_path)

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
        client.sendall(b"GET /tests/_export?clinic_id=C0001 HTTP/1.1\r\nHost: x\r\nX-Request-ID: hang-up\r\n\r\n")
        assert client.recv(1000).startswith(b"HTTP/1.1 200 ")
    # ...and gone, ~14 MB unread.

    deadline = time.monotonic() + 20
    while not [line for line in server.log_lines() if line.get("request_id") == "hang-up"
               and line["message"].startswith("export")]:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    stopped = [line for line in server.log_lines() if line.get("request_id") == "hang-up"][-1]
    assert stopped["message"] == "export stopped before the end" and stopped["count"] < 40_000
    # The same worker reads and writes on: its cursor was closed, no transaction left open.
    assert server.request("POST", "/tests", make_record("after-hang-up", "C0001")).status == 201
    assert sum(1 for line in server.request("GET", "/tests/_export?clinic_id=C0001").body.splitlines()) == 40_001


@pytest.mark.parametrize("content_type, body", [
    ("application/x-ndjson", b"{}\n" * (16 * 1024 * 1024 // 3)),
    ("application/json", b"[" + b"{}," * (16 * 1024 * 1024 // 3 - 1) + b"{}]"),
])
def test_a_16_mib_batch_of_empty_records_is_413_at_once_in_bounded_memory(start_server, content_type, body):
    server = start_server(workers=1)
    worker = server.worker_pids()[0]
    with AnonPeak(worker) as memory:
        started = time.monotonic()
        resp = server.request("POST", "/tests/_batch", body, {"Content-Type": content_type}, timeout=120)
        seconds = time.monotonic() - started
    assert resp.status == 413 and resp.json()["type"].endswith("too-many-records"), resp.body[:300]
    assert server.worker_pids() == [worker]
    # Counted before parsing: the body is read and counted, never parsed into millions of
    # objects (that took ~900 MiB and 8-30 s). Generous bounds: the body itself is 16 MiB.
    assert memory.growth_mib < 96, f"the worker's anonymous memory grew by {memory.growth_mib:.0f} MiB"
    assert seconds < 5
    assert server.request("GET", "/tests?clinic_id=C001").json() == []


def _chunked_exchange(port: int, path: str, request_id: str) -> tuple[bytes, bytes, bool]:
    """GET over a raw socket, read to EOF: (status and headers, the decoded body, whether the
    body ended with its terminating 0 chunk)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Request-ID: {request_id}\r\n\r\n".encode())
        raw = b""
        while data := client.recv(1 << 16):
            raw += data
    head, _, rest = raw.partition(b"\r\n\r\n")
    body = b""
    while b"\r\n" in rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return head, body, rest == b"\r\n"
        if len(rest) < size + 2:
            break
        body, rest = body + rest[:size], rest[size + 2:]
    return head, body, False


def test_a_database_error_mid_export_aborts_the_stream_and_is_logged_as_failed(start_server, tmp_path):
    db = tmp_path / "damaged.db"
    seeded_then_damaged(db, 20_000, damaged_at=5_500)
    server = start_server(workers=1, db_path=db)
    worker = server.worker_pids()[0]

    head, body, terminated = _chunked_exchange(server.port, "/tests/_export?clinic_id=C0001", "exp-midway")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()
    assert not terminated, "a stream cut by a database error ended like a complete one"
    # Every chunk before the damaged page arrived whole: 1,000-record chunks, the 6th broken.
    assert body.endswith(b"\n") and body.count(b"\n") == 5_000
    with pytest.raises(http.client.IncompleteRead):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/tests/_export?clinic_id=C0001")
        conn.getresponse().read()

    lines = [line for line in server.log_lines() if line.get("request_id") == "exp-midway"]
    failed = [line for line in lines if line["message"] == "export failed"]
    assert len(failed) == 1 and failed[0]["level"] == "ERROR"
    assert failed[0]["count"] == 5_000 and "malformed" in failed[0]["error"]
    # gunicorn's own line about the aborted response comes after the request ID was let go of:
    # its message names it, so grep finds it too.
    aborted = [line for line in server.log_lines() if "exp-midway" in line.get("exc_info", "")]
    assert len(aborted) == 1 and aborted[0]["logger"] == "gunicorn.error"
    assert server.worker_pids() == [worker]
    assert server.request("GET", "/health").status == 200
