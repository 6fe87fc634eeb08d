"""Dashboard benchmark: GET / server time at 1,000,000 records, and what keeping its counters costs.

    .venv/bin/python bench/bench_dashboard.py [--records 1000000] [--clinics 1000] [--requests 60]
                                              [--db PATH] [--rounds 3] [--duration 8]

One run on this machine:
  1. fills a database with --records records over --clinics clinics, their created_at spread
     evenly over the last 10 days (so the 7-day chart is full and older hours exist), through
     records_service.store._insert_row -- the one per-row insert every way of creating a record
     uses, so the counter triggers fire as in service -- in 20,000-row transactions. With --db,
     an existing file that already holds the records is reused (fill skipped);
  2. starts our service on it (`gunicorn -c gunicorn.conf.py --no-control-socket`, 2 workers
     whatever --workers says: the requests are sequential), requests GET / --requests times one
     after another after a warm-up, and prints the median, p90 and max of the server time
     (Server-Timing app;dur) and of the client's round trip;
  3. times, on the same file, the scans the counters replace (records per clinic by the clinic
     index, records per hour of created_at), median of --rounds;
  4. measures what the triggers cost writers, with and without them (same schema, triggers
     dropped), --rounds alternating pairs each: CPU time per row of 100,000-row fills in
     20,000-row transactions through the store (as a bulk import or seed would) and per
     single-record transaction (Store.insert, as POST /tests); then wrk POST /tests runs of
     --duration seconds (bench/post_tests.lua, --threads, --connections) against two servers
     started alike (wrk installed with apt-get when missing), as common.measure runs them
     (warm-up, alternating rounds, a wait for other processes to go quiet, the servers' CPU
     time per request read from /proc); prints medians and ratios.
Every gunicorn it started is stopped at the end (SIGTERM, then wait), on error and Ctrl-C too.
For a quick run: --records 20000 --rounds 1 --duration 2 --warmup 1 --quiet-wait 0.
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
from common import (BENCH_DIR, BenchError, Run, Server, clean_env, free_port, gunicorn_argv, load_arguments, log,
                    measure, noisy_warning, parse_load_arguments, run_benchmark, server_settings, summarise)
from records_service.store import Store, _insert_row  # common put the repository on sys.path
from records_service.validate import validate_record

CHUNK = 20_000
HISTORY = timedelta(days=10)
TRIGGERS = ("records_counted",)


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
    """Insert every (record, created_at) through _insert_row, CHUNK rows per transaction."""
    request_id = str(uuid.uuid4())
    done, chunk = 0, []

    def flush() -> None:
        store._write(lambda conn: [_insert_row(conn, record, request_id, created) for record, created in chunk])

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


def drop_triggers(path: Path) -> None:
    # Bench-only SQL: the "without counters" side of the comparison.
    conn = sqlite3.connect(path)
    for name in TRIGGERS:
        conn.execute(f"DROP TRIGGER {name}")
    conn.commit()
    conn.close()


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


def new_database(path: Path, triggers: bool) -> Path:
    store = Store(str(path))
    store.open()
    store.close()
    if not triggers:
        drop_triggers(path)
    return path


def store_costs(work_dir: Path, rounds: int) -> dict[tuple[str, bool], list[float]]:
    """CPU microseconds (process time: steadier than wall time on a shared machine) per row of
    100,000-row fills in CHUNK-row transactions, and per single-record transaction
    (Store.insert, as POST /tests does), with and without the triggers, alternating."""
    results: dict[tuple[str, bool], list[float]] = {(kind, t): [] for kind in ("bulk", "single") for t in (True, False)}
    bulk = list(records(100_000, 1000, "bulk-"))  # generated once: only the inserts are timed
    single = list(records(4000, 1000, "single-", seed=7))
    for n in range(rounds):
        for triggers in ((True, False) if n % 2 == 0 else (False, True)):
            path = new_database(work_dir / f"store-{triggers}-{n}.db", triggers)
            store = Store(str(path))
            started = time.process_time()
            fill(store, iter(bulk))
            results["bulk", triggers].append((time.process_time() - started) / len(bulk) * 1e6)
            started = time.process_time()
            for record, created in single:
                store.insert(record, request_id="bench", now=created)
            results["single", triggers].append((time.process_time() - started) / len(single) * 1e6)
            store.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    return results


def post_costs(wrk: str, work_dir: Path, args: argparse.Namespace, servers: list[Server]) -> list[Run]:
    """wrk POST /tests runs (common.measure) against two servers, on databases with and without
    the triggers, alternating; `servers` collects them, for run_guarded to stop."""
    compared = []
    for triggers in (True, False):
        path = new_database(work_dir / f"post-{triggers}.db", triggers)
        port = free_port()
        env = {**clean_env(), "RECORDS_DB_PATH": str(path), "RECORDS_AUTH": "disabled"}
        server = Server(f"triggers={triggers}", gunicorn_argv(port, args.workers, None), env,
                        path.with_suffix(".log"), port)
        servers.append(server)
        compared.append(server)
        server.start()
    runs: list[Run] = []
    measure(wrk, "POST", BENCH_DIR / "post_tests.lua", compared, args, runs)
    for server in compared:
        server.stop()
    return runs


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = load_arguments(__doc__, "with/without triggers")
    p.set_defaults(duration=8, timeout=10)
    p.add_argument("--records", type=int, default=1_000_000, help="records GET / is timed at (fewer: a quick run)")
    p.add_argument("--clinics", type=int, default=1000, help="clinics the records are spread over")
    p.add_argument("--requests", type=int, default=60, help="GET / requests timed, after 10 of warm-up")
    p.add_argument("--db", type=Path, help="database file to fill, or to reuse when it already holds the records")
    return parse_load_arguments(p, argv)


def run(args: argparse.Namespace, wrk: str, work_dir: Path, servers: list[Server]) -> int:
    """Steps 1 to 4 of the docstring, in `work_dir`; the POST servers go into `servers`."""
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
        log(f"filled in {elapsed:.1f} s ({args.records / elapsed:,.0f} records/s, counters kept by triggers)")
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

    log(f"\nwhat the triggers cost writers ({args.rounds} alternating rounds each, medians):")
    costs = {k: statistics.median(v) for k, v in store_costs(work_dir, args.rounds).items()}
    for kind, what in (("bulk", f"a row in {CHUNK:,}-row transactions"), ("single", "a single-record transaction")):
        with_, without = costs[kind, True], costs[kind, False]
        log(f"  store, CPU for {what:38s} with {with_:5.1f} us   without {without:5.1f} us   (+{with_ - without:.1f} us)")
    log(f"  HTTP, POST /tests: warm-up {args.warmup}s each, then {args.rounds} rounds")
    runs = post_costs(wrk, work_dir, args, servers)
    on, off = (summarise(runs, "POST", f"triggers={t}", args.quiet_below) for t in (True, False))
    log(f"  HTTP, POST /tests (wrk -t{args.threads} -c{args.connections} -d{args.duration}s), non-2xx or errors: "
        f"{on['non2xx'] + on['socket_errors'] + off['non2xx'] + off['socket_errors']}")
    log(f"    server CPU per request: with {on['cpu_us_per_req']:7.0f} us   without {off['cpu_us_per_req']:7.0f} us"
        f"   ratio {on['cpu_us_per_req'] / off['cpu_us_per_req']:.3f}")
    log(f"    requests/s:             with {on['rps']:7,.0f}      without {off['rps']:7,.0f}"
        f"      ratio {on['rps'] / off['rps']:.2f}  (wall clock: moves with the machine's other load)")
    warning = noisy_warning(runs, args.quiet_below)
    if warning:
        log("    " + warning)
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_benchmark(args, "bench-dashboard-", lambda wrk, tmp, servers: run(args, wrk, tmp, servers))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
