"""Reads and refused writes while another program holds the write lock (issue 17, item 1).

    .venv/bin/python bench/bench_held_lock.py [--workers 2] [--writers 80] [--hold 4] [--busy-ms 2000]

Starts our service (gunicorn.conf.py) and, for comparison, the same with sync workers
(`-k sync --threads 1 -w 2*cores+1`, the model before issue 17; with more than one thread
gunicorn quietly runs gthread instead); holds `BEGIN IMMEDIATE` from another
connection for --hold seconds while --writers clients POST at once and one client reads
(`GET /tests`) in a loop; prints each model's read latencies and how long the refused writes took.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sqlite3
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import Server, clean_env, free_port, gunicorn_argv, log, log_command, stop_all


def record(test_id: str) -> bytes:
    return json.dumps({"test_id": test_id, "clinic_id": "C001", "patient_id": "P1", "test_type": "CBC",
                       "result": 1, "collected_at": "2025-05-01T10:00:00Z"}).encode()


def run(name: str, extra: list[str], args, tmp: Path, servers: list) -> None:
    db = tmp / f"{name}.db"
    port = free_port()
    env = {**clean_env(), "RECORDS_DB_PATH": str(db), "RECORDS_AUTH": "disabled",
           "RECORDS_BUSY_TIMEOUT_MS": str(args.busy_ms), "RECORDS_LOG_LEVEL": "WARNING"}
    server = Server(name, gunicorn_argv(port, args.workers, None) + extra, env, tmp / f"{name}.log", port)
    servers.append(server)
    server.start()
    server.request("POST", "/tests", record("before"))
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    writes, reads = [], []

    def write(n: int) -> None:
        started = time.monotonic()
        try:
            status, _ = server.request("POST", "/tests", record(f"w{n}"), timeout=60)
        except OSError:
            status = 0
        writes.append((status, time.monotonic() - started))

    with ThreadPoolExecutor(args.writers) as pool:
        futures = [pool.submit(write, n) for n in range(args.writers)]
        time.sleep(0.2)
        until = time.monotonic() + args.hold
        while time.monotonic() < until:
            started = time.monotonic()
            status, _ = server.request("GET", "/tests?clinic_id=C001", timeout=60)
            reads.append((status, time.monotonic() - started))
        blocker.execute("ROLLBACK")
        for future in futures:
            future.result()
    blocker.close()
    took = sorted(t for _, t in reads)
    refused = sorted(t for s, t in writes if s == 503)
    log(f"{name:28} reads: {len(reads)} answered, median {statistics.median(took) * 1000:,.0f} ms, "
        f"max {took[-1] * 1000:,.0f} ms | writes: {len(refused)} of {len(writes)} refused (503), "
        f"median {statistics.median(refused) * 1000 if refused else 0:,.0f} ms, max {refused[-1] * 1000 if refused else 0:,.0f} ms; "
        f"others {sorted({s for s, _ in writes if s != 503})}")
    server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=multiprocessing.cpu_count())
    p.add_argument("--writers", type=int, default=80)
    p.add_argument("--hold", type=float, default=4.0)
    p.add_argument("--busy-ms", type=int, default=2000)
    args = p.parse_args()
    log_command()
    servers: list = []
    with tempfile.TemporaryDirectory(prefix="records-held-lock-") as tmp:
        try:
            run("ours (gthread, write slots)", [], args, Path(tmp), servers)
            sync = ["-k", "sync", "--threads", "1", "-w", str(2 * multiprocessing.cpu_count() + 1)]
            run("sync workers (before)", sync, args, Path(tmp), servers)
        finally:
            stop_all(servers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
