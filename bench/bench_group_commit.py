"""Group commit against one transaction per write, side by side, without sockets or wrk.

    .venv/bin/python bench/bench_group_commit.py [--processes 2] [--threads 8] [--requests 400] [--rounds 3]

Pre-fills a temporary database (records_gen's records, 20 a clinic over 1,000 clinics), then
each round runs both modes, alternating which goes first: --processes forked processes (as
gunicorn's workers), each building the app after the fork and running --threads threads that
each send --requests POST /tests straight to the WSGI callable (no sockets, so nothing but the
app and the store competes for the GIL and the writers' turn). "grouped" is the service as it
is; "alone" patches `Database.write` to one transaction per write (`common.write_alone`, as
before group commit). Prints per mode: requests/s, CPU per request (all the processes' CPU over
all their requests), the requests per commit and WAL frames per request (counted from the WAL,
with the service's checkpoints held off during the run), medians of the rounds.
"""

from __future__ import annotations

import argparse
import logging.config
import multiprocessing
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import records_gen
from common import (add_page_size_argument, log, log_command, prefill,  # common puts the repository on sys.path
                    wal_frames_and_commits, write_alone)
from profile_app import environ, make_requests


def worker(db: Path, threads: int, requests: int, grouped: bool, out) -> None:
    """One process: the app built after the fork, `threads` threads of POSTs; sends (CPU s, wall s, bad)."""
    os.environ.update({"RECORDS_DB_PATH": str(db), "RECORDS_AUTH": "disabled", "RECORDS_LOG_LEVEL": "INFO"})
    from records_service.app import create_app
    from records_service.logs import logging_config
    from records_service.store.sqlite import connection

    sys.stderr = open(db.parent / f"app-{os.getpid()}.log", "w", buffering=1)
    logging.config.dictConfig(logging_config("INFO"))
    connection.CHECKPOINT_EVERY_COMMITS = float("inf")  # the WAL keeps every frame: counted after
    if not grouped:
        connection.Database.write = write_alone
    app = create_app(writers=threads)
    bodies = [make_requests("POST", requests, records_gen.CLINICS) for _ in range(threads)]
    bad = []

    def run(mine) -> None:
        def start_response(status, headers, exc_info=None):
            if not status.startswith("201"):
                bad.append(status)
        for method, path, query, body in mine:
            b"".join(app(environ(method, path, query, body), start_response))

    pool = [threading.Thread(target=run, args=(mine,)) for mine in bodies]
    cpu, wall = time.process_time(), time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    out.send((time.process_time() - cpu, time.perf_counter() - wall, len(bad)))


def one_run(db: Path, args: argparse.Namespace, grouped: bool) -> dict:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    for _ in range(args.processes):
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(db, args.threads, args.requests, grouped, theirs))
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    results = [pipe.recv() for pipe in pipes]
    for proc in procs:
        proc.join()
    requests = args.processes * args.threads * args.requests
    bad = sum(r[2] for r in results)
    if bad:
        raise SystemExit(f"{bad} of {requests} POSTs were not answered 201")
    frames, commits = wal_frames_and_commits(Path(f"{db}-wal"), page_size)
    return {"req_s": requests / max(r[1] for r in results), "cpu_us": 1e6 * sum(r[0] for r in results) / requests,
            "per_commit": requests / commits, "frames": frames / requests}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=8, help="threads per process")
    p.add_argument("--requests", type=int, default=400, help="POSTs per thread")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-clinic", type=int, default=20)
    add_page_size_argument(p)
    args = p.parse_args()
    log_command()
    with tempfile.TemporaryDirectory(prefix="records-group-commit-") as tmp:
        db = Path(tmp) / "records.db"
        log(f"pre-filled {records_gen.CLINICS * args.per_clinic:,} records in "
            f"{prefill(db, records_gen.CLINICS, args.per_clinic, args.page_size):.1f} s")
        runs: dict[str, list[dict]] = {"grouped": [], "alone": []}
        for n in range(args.rounds):
            for mode in (("grouped", "alone") if n % 2 == 0 else ("alone", "grouped")):
                figures = one_run(db, args, mode == "grouped")
                runs[mode].append(figures)
                log(f"round {n + 1} {mode:8s} {figures['req_s']:8,.0f} req/s  {figures['cpu_us']:6,.0f} us CPU/req"
                    f"  {figures['per_commit']:5.1f} req/commit  {figures['frames']:5.2f} WAL frames/req"
                    f"  (load average {os.getloadavg()[0]:.1f})")
        log(f"\n== {args.processes} processes x {args.threads} threads, {args.requests} POSTs a thread, "
            f"median of {args.rounds} rounds ==")
        med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
        for mode, m in med.items():
            log(f"{mode:8s} {m['req_s']:8,.0f} req/s  {m['cpu_us']:6,.0f} us CPU/req  {m['per_commit']:5.1f} req/commit"
                f"  {m['frames']:5.2f} WAL frames/req")
        log(f"grouped/alone: req/s {med['grouped']['req_s'] / med['alone']['req_s']:.2f}, "
            f"CPU/req {med['grouped']['cpu_us'] / med['alone']['cpu_us']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
