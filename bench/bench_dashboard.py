"""Dashboard benchmark: GET / server time at 1,000,000 records, and what keeping its counters costs.

    .venv/bin/python bench/bench_dashboard.py [--records 1000000] [--clinics 1000] [--requests 60]
                                              [--db PATH] [--rounds 3] [--duration 8]

One run on this machine:
  1. fills a database with --records records over --clinics clinics, their created_at spread
     evenly over the last 10 days (so the 7-day chart is full and older hours exist), through
     records_service.store._insert_row -- the one per-row insert every way of creating a record
     uses, so the counter triggers fire as in service -- in 20,000-row transactions. With --db,
     an existing file that already holds the records is reused (fill skipped);
  2. starts our service on it (`gunicorn -c gunicorn.conf.py --no-control-socket`, 2 workers),
     requests GET / --requests times one after another after a warm-up, and prints the median,
     p90 and max of the server time (Server-Timing app;dur) and of the client's round trip;
  3. times, on the same file, the scans the counters replace (records per clinic by the clinic
     index, records per hour of created_at), median of --rounds;
  4. measures what the triggers cost writers, with and without them (same schema, triggers
     dropped), --rounds alternating pairs each: CPU time per row of 100,000-row fills in
     20,000-row transactions through the store (as a bulk import or seed would) and per
     single-record transaction (Store.insert, as POST /tests); then wrk POST /tests runs of
     --duration seconds (bench/post_tests.lua, 2 threads, 16 connections) against two servers
     started alike (wrk installed with apt-get when missing), with the workers' CPU time per
     request read from /proc; prints medians and ratios.
Every gunicorn it started is stopped at the end (SIGTERM, then wait), on error and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import shlex
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

import records_gen  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from bench_core import BenchError, Server, ensure_wrk, free_port, gunicorn_argv, log, run_wrk  # noqa: E402

from records_service.store import Store, _insert_row  # noqa: E402
from records_service.validate import validate_record  # noqa: E402

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
    env = {**os.environ, "RECORDS_DB_PATH": str(db_path), "RECORDS_AUTH": "disabled", "RECORDS_LOG_LEVEL": "WARNING"}
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


def post_costs(work_dir: Path, rounds: int, duration: float) -> dict[bool, list[dict]]:
    """wrk POST /tests runs against two servers, on databases with and without the triggers, alternating."""
    wrk = ensure_wrk()
    workers = (os.cpu_count() or 1) * 2 + 1  # as gunicorn.conf.py
    wrk_args = argparse.Namespace(threads=2, connections=16, timeout=10)
    servers: dict[bool, Server] = {}
    results: dict[bool, list[dict]] = {True: [], False: []}
    try:
        for triggers in (True, False):
            path = new_database(work_dir / f"post-{triggers}.db", triggers)
            port = free_port()
            env = {**os.environ, "RECORDS_DB_PATH": str(path), "RECORDS_AUTH": "disabled"}
            servers[triggers] = Server(f"triggers={triggers}", gunicorn_argv(port, workers, None), env,
                                       path.with_suffix(".log"), port)
            servers[triggers].start()
            run_wrk(wrk, "POST", servers[triggers].url, wrk_args, 2)  # warm-up
        for n in range(rounds):
            for triggers in ((True, False) if n % 2 == 0 else (False, True)):
                before = cpu_seconds(servers[triggers])
                result, _ = run_wrk(wrk, "POST", servers[triggers].url, wrk_args, duration)
                result["cpu_us_per_request"] = (cpu_seconds(servers[triggers]) - before) / result["requests"] * 1e6
                results[triggers].append(result)
    finally:
        for server in servers.values():
            server.stop()
    return results


def cpu_seconds(server: Server) -> float:
    """User + system CPU time of the server's workers so far: unlike req/s, other load on the
    machine does not change it much."""
    ticks = 0
    for pid in server.worker_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a worker that just exited
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return ticks / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--clinics", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8, help="seconds of each wrk POST run")
    parser.add_argument("--db", type=Path, help="database file to fill, or to reuse when it already holds the records")
    args = parser.parse_args(argv)
    log(f"command: {shlex.join([sys.executable, *sys.argv])}")
    log(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        work_dir = Path(tmp)
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
        posts = post_costs(work_dir, args.rounds, args.duration)
        rps = {k: statistics.median(r["rps"] for r in v) for k, v in posts.items()}
        cpu = {k: statistics.median(r["cpu_us_per_request"] for r in v) for k, v in posts.items()}
        non2xx = sum(r["non2xx"] + r["socket_errors"] for v in posts.values() for r in v)
        log(f"  HTTP, POST /tests (wrk -t2 -c16 -d{args.duration}s), non-2xx or errors: {non2xx}")
        log(f"    worker CPU per request: with {cpu[True]:7.0f} us   without {cpu[False]:7.0f} us"
            f"   ratio {cpu[True] / cpu[False]:.3f}")
        log(f"    requests/s:             with {rps[True]:7,.0f}      without {rps[False]:7,.0f}"
            f"      ratio {rps[True] / rps[False]:.2f}  (wall clock: moves with the machine's other load)")
        for triggers, runs in posts.items():
            rates = ", ".join(f"{run['rps']:,.0f} req/s {run['cpu_us_per_request']:.0f} us" for run in runs)
            log(f"    triggers={triggers!s:5} runs: {rates}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
