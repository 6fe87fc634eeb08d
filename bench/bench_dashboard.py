"""Dashboard benchmark: GET / server time at 1,000,000 records, and the scans its counters replace.

    .venv/bin/python bench/bench_dashboard.py [--records 1000000] [--clinics 1000] [--requests 60]
                                              [--db PATH] [--rounds 3]

One run on this machine:
  1. fills a database with --records records over --clinics clinics, their created_at spread
     evenly over the last 10 days (so the 7-day chart is full and older hours exist), through
     records_service.store.sqlite.records.insert_rows -- the one insert every way of creating a record uses, so
     the counters are kept as in service -- in 20,000-row transactions. With --db,
     an existing file that already holds the records is reused (fill skipped);
  2. starts our service on it (`gunicorn -c gunicorn.conf.py --no-control-socket`, 2 workers
     whatever --workers says: the requests are sequential), requests GET / --requests times one
     after another after a warm-up, and prints the median, p90 and max of the server time
     (Server-Timing app;dur) and of the client's round trip;
  3. times, on the same file, the scans the counters replace (records per clinic by the clinic
     index, records per hour of created_at), median of --rounds;
Every gunicorn it started is stopped at the end (SIGTERM, then wait), on error and Ctrl-C too.
For a quick run: --records 20000 --rounds 1.
"""

from __future__ import annotations

import argparse
import http.client
import random
import sqlite3
import statistics
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import records_gen
from common import BenchError, Server, clean_env, free_port, gunicorn_argv, log, run_benchmark, server_settings
from records_service.store import prepare  # common put the repository on sys.path
from records_service.store.sqlite import SQLiteStore as Store
from records_service.store.sqlite.records import insert_rows
from records_service.validate import validate_record

CHUNK = 20_000
HISTORY = timedelta(days=10)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def records(count: int, clinics: int, prefix: str, seed: int = 20240501):
    """(record, created_at) pairs: valid, normalised records, created evenly over HISTORY up to now."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    first = now - HISTORY
    for n in range(count):
        doc = records_gen.make_record(f"{prefix}{n:07d}", records_gen.clinic_id(n % clinics + 1), rng)
        record, errors = validate_record(doc, now)
        if errors:
            raise BenchError(f"generated record is invalid: {errors}")
        yield record, stamp(first + HISTORY * (n / count))


def fill(store: Store, pairs, report_every: int = 0) -> int:
    """Insert every (record, created_at) through the store's insert, CHUNK rows per transaction."""
    request_id = str(uuid.uuid4())
    done, chunk = 0, []

    def flush() -> None:
        store._write(lambda conn: insert_rows(conn, [prepare(record, request_id, created) for record, created in chunk],
                                              None))

    for pair in pairs:
        chunk.append(pair)
        if len(chunk) == CHUNK:
            flush()
            done += len(chunk)
            chunk = []
            if report_every and done % report_every == 0:
                log(f"  {done:,} records")
    if chunk:
        flush()
        done += len(chunk)
    return done


def scan_costs(path: Path, rounds: int) -> dict[str, float]:
    """Milliseconds the dashboard's figures would take computed from `records` itself (bench-only SQL)."""
    since = (datetime.now(timezone.utc) - timedelta(days=7)).strftime("%Y-%m-%dT%H")
    queries = {
        "records per clinic (GROUP BY on the clinic index)": ("SELECT clinic_id, count(*) FROM records GROUP BY 1", ()),
        "records per hour, last 7 days (scan of records)":
            ("SELECT substr(created_at, 1, 13), count(*) FROM records WHERE created_at >= ? GROUP BY 1", (since,)),
    }
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    costs = {}
    for name, (sql, params) in queries.items():
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            conn.execute(sql, params).fetchall()
            times.append((time.perf_counter() - started) * 1000)
        costs[name] = statistics.median(times)
    conn.close()
    return costs


def dashboard_times(db_path: Path, requests: int) -> tuple[list[float], list[float], int]:
    """(server ms from Server-Timing, client round-trip ms, page bytes) of GET / on real gunicorn."""
    port = free_port()
    env = {**clean_env(), "RECORDS_DB_PATH": str(db_path), "RECORDS_AUTH": "disabled", "RECORDS_LOG_LEVEL": "WARNING"}
    server = Server("records_service", gunicorn_argv(port, 2, None), env, db_path.with_suffix(".gunicorn.log"), port)
    server_ms, client_ms, size = [], [], 0
    try:
        server.start()
        for n in range(requests + 10):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            started = time.perf_counter()
            conn.request("GET", "/")
            resp = conn.getresponse()
            body = resp.read()
            elapsed = (time.perf_counter() - started) * 1000
            conn.close()
            if resp.status != 200:
                raise BenchError(f"GET / answered {resp.status}\n{server.output_tail()}")
            if n >= 10:  # the first requests of each worker open its connection and warm its caches
                server_ms.append(float(resp.getheader("Server-Timing").split("dur=")[1]))
                client_ms.append(elapsed)
                size = len(body)
    finally:
        server.stop()
    return server_ms, client_ms, size


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Its own options only: nothing here runs wrk, so the other benchmarks' load options do not apply."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="timings of each scan; the median is reported")
    p.add_argument("--records", type=int, default=1_000_000, help="records GET / is timed at (fewer: a quick run)")
    p.add_argument("--clinics", type=int, default=1000, help="clinics the records are spread over")
    p.add_argument("--requests", type=int, default=60, help="GET / requests timed, after 10 of warm-up")
    p.add_argument("--db", type=Path, help="database file to fill, or to reuse when it already holds the records")
    p.set_defaults(workers=None)  # server_settings reports gunicorn.conf.py's count; GET / runs on 2 workers
    args = p.parse_args(argv)
    if min(args.rounds, args.requests) < 1:
        p.error("--rounds and --requests must be at least 1")
    return args


def run(args: argparse.Namespace, wrk: str, work_dir: Path, servers: list[Server]) -> int:
    """Steps 1 to 3 of the docstring, in `work_dir`."""
    server_settings(args, wrk, clean_env(), work_dir)
    db_path = args.db or work_dir / "records.db"
    store = Store(str(db_path))
    existing = store.count()
    if existing >= args.records:
        log(f"reusing {db_path} with {existing:,} records")
    else:
        if existing:
            raise BenchError(f"{db_path} holds {existing:,} records, fewer than --records; use a new file")
        log(f"filling {db_path} with {args.records:,} records over {args.clinics:,} clinics ...")
        started = time.perf_counter()
        fill(store, records(args.records, args.clinics, "seed-"), report_every=200_000)
        elapsed = time.perf_counter() - started
        log(f"filled in {elapsed:.1f} s ({args.records / elapsed:,.0f} records/s, counters kept by the store)")
    store.close()
    size = sum(Path(f"{db_path}{s}").stat().st_size for s in ("", "-wal") if Path(f"{db_path}{s}").exists())
    log(f"database and WAL: {size / 2**20:,.0f} MiB")

    server_ms, client_ms, page_bytes = dashboard_times(db_path, args.requests)
    log(f"\nGET / at {max(existing, args.records):,} records, {len(server_ms)} requests after 10 warm-up "
        f"({page_bytes:,}-byte page):")
    for name, values in (("server time (Server-Timing)", server_ms), ("client round trip", client_ms)):
        log(f"  {name:28s} median {statistics.median(values):6.2f} ms   p90 {percentile(values, 0.9):6.2f} ms"
            f"   max {max(values):6.2f} ms")
    verdict = "PASS" if statistics.median(server_ms) < 50 else "MISS"
    log(f"  target: median server time under 50 ms -> {verdict}")

    log(f"\nwhat the counters replace, on the same file (median of {args.rounds}):")
    for name, ms in scan_costs(db_path, args.rounds).items():
        log(f"  {name:52s} {ms:8.1f} ms")

    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_benchmark(args, "bench-dashboard-", lambda wrk, tmp, servers: run(args, wrk, tmp, servers))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
