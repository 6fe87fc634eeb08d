"""The two engines side by side: ours on PostgreSQL, ours on SQLite and the bare Falcon app, in one run.

    .venv/bin/python bench/bench_engines.py [--db /tmp/records-bench-1m.db] [--duration 10] [--rounds 3]
                                            [--scenarios post,page,batch,export]

One run:
  1. installs wrk when missing; builds the SQLite database with `python -m records_service seed
     --records 1000000 --clinics 500 --random-seed 1` unless --db holds it already (as
     bench_scale.py does, and reused with it), and works on a copy;
  2. starts a throwaway PostgreSQL cluster with Debian's binaries (tests.live.PostgresCluster:
     fsync on, synchronous_commit on, shared_buffers 256MB) and fills it from the copy with
     `python -m records_service copy`, so both engines hold the very same records;
  3. starts, under the very same gunicorn settings, `sqlite` (ours on the copy), `postgres`
     (ours on PostgreSQL) and `bare` (bare_scale_app.py, constant answers of ours' sizes);
  4. POST /tests (post_tests.lua), with a fourth server in the same rounds, `pg-async`: ours on
     the same PostgreSQL with synchronous_commit=off for its connections (set in the URL), which
     shows what bounds a single-row commit;
  5. a page of 100 of a random clinic (scale_pages.lua, no filter) at 1,000,000 records;
  6. POST /tests/_batch of 1,000 records, each for a random one of the 500 clinics
     (scale_batch.lua mixed);
  7. the largest clinic's export (C0001, about 109,000 records) streamed whole, records/s;
  8. each scenario: a warm-up of each server, then --rounds rounds alternating the order
     (common.measure); prints medians and the ratios postgres/sqlite, sqlite/bare, postgres/bare.
Every gunicorn and the cluster are stopped at the end, on error and Ctrl-C too.
A smoke run: --records 20000 --clinics 50 --db /tmp/records-bench-20k.db --duration 1 --warmup 1 --rounds 1 --quiet-wait 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import records_gen
from bench_scale import BARE_APP, add_database_arguments, alternate, db_count, ensure_database, stream
from common import (ROOT, BenchError, Server, clean_env, finish, free_port, gunicorn_argv, load_arguments, log,
                    pair_ratios, parse_load_arguments, process_stats, run_benchmark, server_settings)

# shared_buffers as a host of its own would set it (the tests' clusters keep 32MB).
PG_CONF = "shared_buffers = 256MB\neffective_cache_size = 1GB\n"
SCENARIOS = ("post", "page", "batch", "export")
ENGINES = ("bare", "sqlite", "postgres")


def start_postgres(tmp: Path, source: Path, clinics: int):
    """A cluster of its own holding a copy of `source`; (cluster, URL of its `records` database)."""
    from tests.live import PostgresCluster, admin  # the tests' cluster, so both build it one way

    cluster = PostgresCluster().start()
    cluster.stop()
    with open(cluster.data / "postgresql.conf", "a") as conf:
        conf.write(PG_CONF)
    cluster.start_server()
    admin(cluster.url(), "CREATE DATABASE records")
    url = cluster.url("records")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "records_service", "copy", "--from", str(source), "--to", url], cwd=ROOT,
                   env=clean_env(), check=True, capture_output=True, text=True)
    log(f"postgresql: {cluster.dir} on port {cluster.port}; copied {db_count(source):,} records from SQLite in "
        f"{time.perf_counter() - started:.0f}s (python -m records_service copy)")
    admin(url, "VACUUM ANALYZE")
    return cluster, url


def cluster_cpu_s(cluster) -> float:
    """CPU seconds used so far by the cluster's live processes (the postmaster and its children):
    PostgreSQL's own work, which the run lines count as "other"."""
    root = cluster.postmaster_pid()
    ticks = sum(int(rest[11]) + int(rest[12]) for pid, rest in process_stats() if root in (pid, int(rest[1])))
    return ticks / os.sysconf("SC_CLK_TCK")


def pg_count(url: str) -> int:
    from tests.live import admin

    return admin(url, "SELECT count(*) FROM records")[0][0]


def post_size(server: Server) -> int:
    rng = random.Random(7)
    sizes = []
    for i in range(10):
        record = records_gen.make_record(records_gen.bench_test_id("sizing00", 99, i + 1), "C9999", rng)
        status, body = server.request("POST", "/tests", json.dumps(record).encode())
        if status != 201:
            raise BenchError(f"sizing POST answered {status}: {body[:300]!r}")
        sizes.append(len(body))
    return round(statistics.mean(sizes))


def page_size(server: Server, clinics: int) -> tuple[int, int]:
    rng = random.Random(11)
    sizes, counts = [], []
    for _ in range(100):
        status, body = server.request("GET", f"/tests?clinic_id={records_gen.clinic_id(rng.randint(1, clinics))}"
                                             "&limit=100")
        if status != 200:
            raise BenchError(f"sizing GET answered {status}: {body[:300]!r}")
        sizes.append(len(body))
        counts.append(len(json.loads(body)))
    return round(statistics.mean(sizes)), max(1, round(statistics.mean(counts)))


def export_rounds(servers: list[Server], rounds: int) -> dict[str, dict]:
    """C0001's export streamed whole by each server, alternating the order; records/s medians."""
    path = "/tests/_export?clinic_id=C0001"
    for server in servers:
        stream(server, path)  # warm-up: caches, the first connection of each thread
    rates: dict[str, list[float]] = {server.name: [] for server in servers}
    records: dict[str, int] = {}
    for rnd in range(rounds):
        for server in servers if rnd % 2 == 0 else list(reversed(servers)):
            lines, _, seconds = stream(server, path)
            rates[server.name].append(lines / seconds)
            records[server.name] = lines
            log(f"  export {server.name:9} round {rnd + 1}: {lines / seconds:10,.0f} records/s ({seconds:.2f} s)")
    return {name: {"records_s": statistics.median(r), "records": records[name], "all": [round(x) for x in r]}
            for name, r in rates.items()}


def ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def report(results: dict, args) -> str:
    out = ["", f"== engines: bare Falcon, ours on SQLite, ours on PostgreSQL; {args.records:,} records over "
               f"{args.clinics} clinics, medians of {args.rounds} rounds x {args.duration}s ==",
           f"{'scenario':22}{'bare':>11}{'sqlite':>11}{'postgres':>11}{'pg/sqlite':>11}{'sqlite/bare':>12}"
           f"{'pg/bare':>9}  unit; p99 sqlite / postgres"]
    units = {"post": "req/s", "page": "req/s", "batch": "records/s", "export": "records/s"}
    for name in SCENARIOS:
        r = results.get(name)
        if not r:
            continue
        scale = 1000 if name == "batch" else 1
        rate = {engine: r[engine]["rps" if name != "export" else "records_s"] * scale for engine in ENGINES}
        tail = "" if name == "export" else f"; {r['sqlite']['p99_ms']:.1f} / {r['postgres']['p99_ms']:.1f} ms"
        pairs = "" if name == "export" else f"; pg/sqlite by round {r['pairs']}"
        out.append(f"{name:22}{rate['bare']:11,.0f}{rate['sqlite']:11,.0f}{rate['postgres']:11,.0f}"
                   f"{ratio(rate['postgres'], rate['sqlite']):11.2f}{ratio(rate['sqlite'], rate['bare']):12.2f}"
                   f"{ratio(rate['postgres'], rate['bare']):9.2f}  {units[name]}{tail}{pairs}")
        if name == "batch" and "cluster_cpu_ms" in r["postgres"]:
            out.append(f"{'':22}CPU per batch: sqlite's gunicorn {r['sqlite']['cpu_us_per_req'] / 1000:.0f} ms; "
                       f"postgres' gunicorn {r['postgres']['cpu_us_per_req'] / 1000:.0f} ms + PostgreSQL "
                       f"{r['postgres']['cluster_cpu_ms']} ms (its processes over the scenario)")
        if name == "post" and "pg-async" in r:
            out.append(f"{'post, pg-async':22}{'':11}{'':11}{r['pg-async']['rps']:11,.0f}"
                       f"{ratio(r['pg-async']['rps'], r['sqlite']['rps']):11.2f}{'':12}"
                       f"{ratio(r['pg-async']['rps'], r['bare']['rps']):9.2f}  req/s, synchronous_commit=off;"
                       f" pg-async/postgres {ratio(r['pg-async']['rps'], r['postgres']['rps']):.2f}")
    if "export" in results:
        out.append(f"export: C0001, {results['export']['sqlite']['records']:,} records a run on SQLite, "
                   f"{results['export']['postgres']['records']:,} on PostgreSQL (the POST and batch load add to it)")
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = load_arguments(__doc__, "bare/sqlite/postgres")
    add_database_arguments(p)
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated: which rows to run (e.g. batch alone)")
    args = parse_load_arguments(p, argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if set(args.scenarios) - set(SCENARIOS):
        p.error(f"--scenarios takes {', '.join(SCENARIOS)}")
    args.all_runs = []
    return args


def run(args: argparse.Namespace, wrk: str, tmp: Path, servers: list[Server], clusters: list) -> int:
    source = Path(args.db)
    ensure_database(source, args.records, args.clinics)
    db = tmp / "records.db"
    shutil.copyfile(source, db)
    cluster, url = start_postgres(tmp, db, args.clinics)
    clusters.append(cluster)

    base_env = clean_env()
    ours_env = {**base_env, "RECORDS_AUTH": "disabled", "RECORDS_LOG_LEVEL": "INFO"}
    server_settings(args, wrk, {**ours_env, "RECORDS_DB_PATH": str(db)}, tmp)
    envs = {"sqlite": {**ours_env, "RECORDS_DB_PATH": str(db)},
            "postgres": {**ours_env, "RECORDS_DB_PATH": str(tmp / "unused.db"), "RECORDS_DATABASE_URL": url},
            "pg-async": {**ours_env, "RECORDS_DB_PATH": str(tmp / "unused.db"),
                         "RECORDS_DATABASE_URL": url + "?options=-csynchronous_commit%3Doff"}}

    def start(name: str, app: str | None, env: dict) -> Server:
        port = free_port()
        server = Server(name, gunicorn_argv(port, args.workers, app), env, tmp / f"{name}.log", port)
        servers.append(server)
        server.start()
        return server

    def stop(server: Server) -> None:
        server.stop()
        servers.remove(server)

    ours = {name: start(name, None, envs[name]) for name in ("sqlite", "postgres")}
    results: dict = {}

    def compare(name: str, script: str, script_args: list[str], bare_env: dict, extra: list[Server] = (),
                connections: int | None = None) -> None:
        bare = start("bare", BARE_APP, {**base_env, **bare_env})
        try:
            log(f"\n  {name}")
            runs_before = len(args.all_runs)
            results[name] = alternate(wrk, name, script, [bare, ours["sqlite"], ours["postgres"], *extra], args,
                                      script_args, connections=connections)
            results[name]["pairs"] = pair_ratios(args.all_runs[runs_before:], name, "postgres", "sqlite")
        finally:
            stop(bare)

    if "post" in args.scenarios:
        async_server = start("pg-async", None, envs["pg-async"])
        try:
            compare("post", "post_tests.lua", [], {"BENCH_POST_BODY_BYTES": str(post_size(ours["sqlite"]))},
                    extra=[async_server])
        finally:
            stop(async_server)
    if "page" in args.scenarios:
        size, records = page_size(ours["sqlite"], args.clinics)
        compare("page", "scale_pages.lua", [str(args.clinics), "none", ""],
                {"BENCH_GET_BODY_BYTES": str(size), "BENCH_GET_RECORDS": str(records)})
    if "batch" in args.scenarios:
        before = {"sqlite": db_count(db), "postgres": pg_count(url)}
        cpu_before = cluster_cpu_s(cluster)
        compare("batch", "scale_batch.lua", [str(args.clinics), "mixed", "1000"], {"BENCH_BATCH_BODY_BYTES": "49"},
                connections=args.batch_connections)
        stored = {"sqlite": db_count(db) - before["sqlite"], "postgres": pg_count(url) - before["postgres"]}
        # Over the whole scenario (warm-up and the SQLite runs included, where it idles): PostgreSQL's
        # CPU per 1,000 records it stored, beside the gunicorn CPU per batch of each run line.
        results["batch"]["postgres"]["cluster_cpu_ms"] = round(
            (cluster_cpu_s(cluster) - cpu_before) * 1e6 / max(1, stored["postgres"]))
        for engine, count in stored.items():
            if count < results["batch"][engine]["requests"] * 1000:
                raise BenchError(f"{engine} answered {results['batch'][engine]['requests']} batches but stored "
                                 f"only {count:,} records")
        log(f"    stored in this scenario (warm-up included): sqlite {stored['sqlite']:,}, "
            f"postgres {stored['postgres']:,}")
    if "export" in args.scenarios:
        lines, size, _ = stream(ours["sqlite"], "/tests/_export?clinic_id=C0001")
        bare = start("bare", BARE_APP, {**base_env, "BENCH_EXPORT_LINES": str(lines),
                                        "BENCH_EXPORT_LINE_BYTES": str(round(size / lines))})
        try:
            log(f"\n  export: C0001, {lines:,} records, {size / 1e6:.1f} MB a run")
            results["export"] = export_rounds([bare, ours["sqlite"], ours["postgres"]], args.rounds)
        finally:
            stop(bare)

    finish(report(results, args), results, args.all_runs, args.quiet_below, "engines")
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    clusters: list = []

    def work(wrk: str, tmp: Path, servers: list[Server]) -> int:
        try:
            return run(args, wrk, tmp, servers, clusters)
        finally:
            for server in list(servers):  # before the cluster, so no worker logs a lost connection
                server.stop()
            servers.clear()
            for cluster in clusters:
                cluster.destroy()

    return run_benchmark(args, "records-engines-", work)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
