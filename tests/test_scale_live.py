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

from records_service.seed import seed_rows
from records_service.store.sqlite import SQLiteStore as Store
from tests.test_gunicorn import make_record

NDJSON = {"Content-Type": "application/x-ndjson"}


def post_batch(server, records) -> dict:
    resp = server.request("POST", "/tests/_batch", "\n".join(json.dumps(r) for r in records), NDJSON)
    assert resp.status == 200, resp.body
    return resp.json()


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


def _anonymous_kib(pid: int) -> int:
    """The worker's own memory: its anonymous pages (smaps_rollup), not VmHWM, which also counts
    pages of a memory-mapped database file, page cache shared with every process."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        return int(re.search(r"^Anonymous:\s+(\d+) kB$", rollup.read(), re.M).group(1))


class AnonymousPeak:
    """The largest anonymous memory of `pid` seen while the block runs, sampled every 5 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.kib = pid, _anonymous_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.kib = max(self.kib, _anonymous_kib(self.pid))

    def __enter__(self) -> "AnonymousPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


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
    with AnonymousPeak(worker) as small_peak:
        assert _export(server, window)[0] == small
    with AnonymousPeak(worker) as large_peak:
        count, size = _export(server, "clinic_id=C0001")

    assert count == 200_000
    assert server.worker_pids() == [worker]
    # Ten times the records (here ~70 MB of NDJSON) and the worker's own memory stays put.
    growth_kib = large_peak.kib - small_peak.kib
    assert growth_kib < 4 * 1024, f"anonymous memory grew by {growth_kib} KiB while exporting {size:,} bytes"
    done = [line for line in server.log_lines() if line["message"] == "export completed"]
    assert [line["count"] for line in done] == [small, 200_000]
    assert all(line.get("request_id") for line in done)


def test_a_client_that_hangs_up_mid_export_leaves_the_worker_serving(start_server, tmp_path):
    db = tmp_path / "hangup.db"
    store = Store(str(db))
    for _ in store.bulk_insert(seed_rows(40_000, 1, datetime.now(timezone.utc), rng_seed=5)):
        pass
    store.close()
    server = start_server(workers=1, db_path=db)

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
