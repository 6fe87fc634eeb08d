"""Records at scale: records_service against the bare Falcon reference on 1,000,000 records.

    .venv/bin/python bench/bench_scale.py [--db /tmp/records-bench-1m.db] [--duration 10] [--rounds 3]
                                          [--scenarios pages,stats,export,batch] [--profile] [--with-sql SQL]

One run:
  1. installs wrk when missing; builds the database with `python -m records_service seed
     --records 1000000 --clinics 500 --random-seed 1` unless --db already holds it (build it
     once, reuse it: the run works on a copy, so the batch scenario never grows the original);
  2. starts ours (`gunicorn -c gunicorn.conf.py`, auth off) on the copy and bench/bare_scale_app.py
     under the very same gunicorn settings, each on a free loopback port;
  3. pages: GET /tests?clinic_id=<random of 500>&limit=100 without a filter and with each filter
     (patient_id, test_type, status, a one-month collected_from/collected_to range); the bare
     app answers a constant body of the mean size ours answered for that scenario;
  4. stats: GET /tests/_stats?clinic_id=<random>, and the largest clinic on its own;
  5. export: the largest clinic (about 109,000 records) streamed whole, records/s, and the peak
     memory (VmHWM) of ours' workers before and after;
  6. batch: POST /tests/_batch with 1,000-record NDJSON bodies, each for one random clinic (a lab
     pushing its results), then with every record for a random clinic (the worst case);
  7. each wrk scenario: a short warm-up of each app, then --rounds pairs alternating which app
     goes first (common.measure: before each measured run it waits, up to --quiet-wait s, for
     other processes to go quiet, and each run line shows the CPU cores used by our servers,
     by wrk and by everything else); prints medians, ratios and PASS/MISS against the issue's
     targets.
Every gunicorn it started is stopped at the end, on error and Ctrl-C too.
A quick smoke run on a small database (its own --db: the default holds the million):
--records 20000 --clinics 50 --db /tmp/records-bench-20k.db --duration 1 --warmup 1 --rounds 1 --quiet-wait 0
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

from common import (BENCH_DIR, ROOT, BenchError, Run, Server, add_page_size_argument, add_with_sql_argument,
                    clean_env, finish, free_port, gunicorn_argv, load_arguments, log, make_database, measure,
                    parse_load_arguments, profile_summary, py_spy, py_spy_done, run_benchmark, server_settings,
                    summarise, with_sql, wrk_once)
from records_service import seed  # common put the repository on sys.path
from records_service.store.sqlite import records as store

BARE_APP = "bare_scale_app:create_app()"
PAGE_FILTERS = ("none", "patient_id", "test_type", "status", "collected")
TARGETS = {"page_p99_ms": 15.0, "page_ratio": 0.50, "batch_records_s": 80_000, "export_records_s": 150_000,
           "stats_p99_ms": 50.0}


# -- the database ------------------------------------------------------------------------------

def db_count(path: Path) -> int | None:
    if not path.exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM records").fetchone()[0]
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def ensure_database(path: Path, records: int, clinics: int, page_size: int | None) -> None:
    count = db_count(path)
    if count == records:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        has_page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.close()
        if page_size not in (None, has_page_size):
            raise BenchError(f"{path} has {has_page_size}-byte pages, not {page_size}: pass another --db")
        log(f"database: {path} ({records:,} records, {has_page_size}-byte pages, reused)")
        return
    if count is not None:
        raise BenchError(f"{path} holds {count:,} records, not {records:,}: remove it or pass another --db")
    make_database(path, page_size)
    cmd = [sys.executable, "-m", "records_service", "seed", "--records", str(records), "--clinics", str(clinics),
           "--random-seed", "1"]
    log(f"database: building {path} with: RECORDS_DB_PATH={path} {shlex.join(cmd)}")
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "RECORDS_DB_PATH": str(path)}, check=True,
                   stderr=subprocess.DEVNULL if not sys.stderr.isatty() else None)


def log_page_plans(path: Path) -> None:
    """How a page filtered by test type or status is read (after --with-sql may have changed it)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for name in ("test_type", "status"):
            sql, params = store.select_records({"clinic_id": "C0001", name: "x"}, 0, 101)
            plan = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()[-1][-1]
            log(f"  a page by {name} reads: {plan}")
    finally:
        conn.close()


def month_bounds(path: Path) -> list[str]:
    """Month boundaries (URL-encoded RFC 3339) across the collection times of the database."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        first, last = conn.execute("SELECT min(collected_at), max(collected_at) FROM records").fetchone()
    finally:
        conn.close()
    year, month = int(first[:4]), int(first[5:7])
    bounds = []
    while f"{year:04d}-{month:02d}" <= last[:7]:
        bounds.append(quote(f"{year:04d}-{month:02d}-01T00:00:00Z", safe=""))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    bounds.append(quote(f"{year:04d}-{month:02d}-01T00:00:00Z", safe=""))
    return bounds


# -- load --------------------------------------------------------------------------------------

def alternate(wrk: str, scenario: str, script: str, servers: list[Server], args, script_args: list[str],
              connections: int | None = None) -> dict[str, dict]:
    """common.measure of `script` on `servers` (bare, ours); the medians of each app's runs."""
    runs: list[Run] = []
    measure(wrk, scenario, BENCH_DIR / script, servers, args, runs, lambda server: script_args,
            connections=connections)
    args.all_runs += runs
    return {server.name: summarise(runs, scenario, server.name, args.quiet_below) for server in servers}


def get(server: Server, path: str, timeout: float = 60) -> tuple[int, bytes]:
    return server.request("GET", path, timeout=timeout)


def restart_bare(bare: Server | None, port: int, args, env: dict, tmp: Path) -> Server:
    if bare is not None:
        bare.stop()
    server = Server("bare", gunicorn_argv(port, args.workers, BARE_APP), env, tmp / "bare.log", port)
    server.start()
    return server


# -- scenarios ---------------------------------------------------------------------------------

def page_query(rng: random.Random, clinics: int, name: str, values: list[str]) -> str:
    """The query scale_pages.lua makes (same choices), for sizing ours' answers."""
    number = f"{rng.randint(1, clinics):04d}"
    query = f"/tests?clinic_id=C{number}&limit=100"
    if name == "patient_id":
        return query + f"&patient_id=P{number}-{rng.randint(0, 9):06d}"
    if name == "collected":
        i = rng.randrange(len(values) - 1)
        return query + f"&collected_from={values[i]}&collected_to={values[i + 1]}"
    if name != "none":
        return query + f"&{name}={rng.choice(values)}"
    return query


def bench_pages(wrk, ours, bare_env, args, tmp, results, bounds) -> None:
    values = {"none": [], "patient_id": [], "collected": bounds,
              "test_type": [quote(t[0], safe="") for t in seed.NUMERIC_TESTS + seed.TEXT_TESTS],
              "status": [s for s, _ in seed.STATUSES]}
    bare = None
    try:
        for name in PAGE_FILTERS:
            rng = random.Random(11)
            sizes, counts = [], []
            for _ in range(200):
                status, body = get(ours, page_query(rng, args.clinics, name, values[name]))
                if status != 200:
                    raise BenchError(f"sizing GET answered {status}: {body[:300]!r}")
                sizes.append(len(body))
                counts.append(len(json.loads(body)))
            size, records = round(statistics.mean(sizes)), max(1, round(statistics.mean(counts)))
            log(f"\n  pages, filter {name}: ours answers {size} bytes, {statistics.mean(counts):.1f} records (means)")
            bare = restart_bare(bare, free_port(), args, {**bare_env, "BENCH_GET_BODY_BYTES": str(size),
                                                          "BENCH_GET_RECORDS": str(records)}, tmp)
            medians = alternate(wrk, f"page {name}", "scale_pages.lua", [bare, ours], args,
                                [str(args.clinics), name, ",".join(values[name])])
            results[f"page {name}"] = {"bytes": size, "records": statistics.mean(counts), **medians}
    finally:
        if bare is not None:
            bare.stop()


def bench_stats(wrk, ours, bare_env, args, tmp, results) -> None:
    rng = random.Random(12)
    sizes = [len(get(ours, f"/tests/_stats?clinic_id=C{rng.randint(1, args.clinics):04d}")[1]) for _ in range(100)]
    size = round(statistics.mean(sizes))
    log(f"\n  stats: ours answers {size} bytes (mean)")
    bare = restart_bare(None, free_port(), args, {**bare_env, "BENCH_STATS_BODY_BYTES": str(size)}, tmp)
    try:
        medians = alternate(wrk, "stats", "get_tests.lua", [bare, ours], args, [str(args.clinics), "/tests/_stats"])
    finally:
        bare.stop()
    largest = []
    for _ in range(20):
        started = time.perf_counter()
        get(ours, "/tests/_stats?clinic_id=C0001")
        largest.append((time.perf_counter() - started) * 1000)
    results["stats"] = {"bytes": size, **medians,
                        "largest_ms": {"p50": statistics.median(largest), "max": max(largest)}}
    log(f"    ours, largest clinic C0001 alone, 20 sequential: p50 {statistics.median(largest):.1f} ms,"
        f" max {max(largest):.1f} ms")


def stream(server: Server, path: str) -> tuple[int, int, float]:
    """GET a streamed body to the end: (lines, bytes, seconds)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        started = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        if resp.status != 200:
            raise BenchError(f"{server.name} {path} answered {resp.status}")
        lines = size = 0
        while chunk := resp.read(1 << 20):
            lines += chunk.count(b"\n")
            size += len(chunk)
        return lines, size, time.perf_counter() - started
    finally:
        conn.close()


def peak_rss_mib(server: Server) -> dict[int, float]:
    peaks = {}
    for pid in server.worker_pids():
        status = Path(f"/proc/{pid}/status").read_text()
        peaks[pid] = int(re.search(r"^VmHWM:\s+(\d+) kB$", status, re.M).group(1)) / 1024
    return peaks


def bench_export(ours, bare_env, args, tmp, results) -> None:
    path = "/tests/_export?clinic_id=C0001"
    stream(ours, path)  # warm the OS page cache: the rounds compare steady states
    before = peak_rss_mib(ours)
    lines, size, _ = stream(ours, path)
    bare = restart_bare(None, free_port(), args, {**bare_env, "BENCH_EXPORT_LINES": str(lines),
                                                   "BENCH_EXPORT_LINE_BYTES": str(round(size / lines))}, tmp)
    rates: dict[str, list[float]] = {"bare": [], "ours": []}
    try:
        log(f"\n  export: C0001, {lines:,} records, {size / 1e6:.1f} MB a run")
        for rnd in range(args.rounds):
            for server in (bare, ours) if rnd % 2 == 0 else (ours, bare):
                count, _, seconds = stream(server, path)
                rates[server.name].append(count / seconds)
                log(f"    {server.name:5} round {rnd + 1}: {count / seconds:12,.0f} records/s  ({seconds:.2f} s)")
    finally:
        bare.stop()
    after = peak_rss_mib(ours)
    results["export"] = {"records": lines, "bytes": size,
                         **{app: {"records_s": statistics.median(r), "all": [round(x) for x in r]}
                            for app, r in rates.items()},
                         "peak_rss_mib_before": max(before.values()), "peak_rss_mib_after": max(after.values())}
    log(f"    ours' workers, largest VmHWM: {max(before.values()):.1f} MiB after one export,"
        f" {max(after.values()):.1f} MiB after {args.rounds + 1} more ({size / 1e6:.0f} MB each)")


def bench_batch(wrk, ours, bare_env, args, tmp, results, db: Path, profile: bool) -> None:
    for mode in ("clinic", "mixed"):
        before = db_count(db)
        bare = restart_bare(None, free_port(), args, {**bare_env, "BENCH_BATCH_BODY_BYTES": "49"}, tmp)
        try:
            log(f"\n  batch of 1,000 records, {mode}: bodies for {'one random clinic' if mode == 'clinic' else 'random clinics per record'}")
            medians = alternate(wrk, f"batch {mode}", "scale_batch.lua", [bare, ours], args,
                                [str(args.clinics), mode, "1000"], connections=args.batch_connections)
        finally:
            bare.stop()
        stored = db_count(db) - before
        requests = medians["ours"]["requests"]
        results[f"batch {mode}"] = medians | {"stored": stored}
        log(f"    ours stored {stored:,} records in this scenario (warm-up included)")
        if stored < requests * 1000:
            raise BenchError(f"ours answered {requests} batches but stored only {stored:,} records")
        if profile and mode == "clinic":
            raw = tmp / "profile-batch.txt"
            spy = py_spy(ours, args.duration + 1, raw)
            result = wrk_once(wrk, BENCH_DIR / "scale_batch.lua", ours.url, args, args.duration,
                              [str(args.clinics), mode, "1000"], args.batch_connections)
            py_spy_done(spy, raw, timeout=args.duration + 60)
            log(f"\n[profile] batch ({mode}) on ours under py-spy (250 Hz): {result['rps'] * 1000:,.0f} records/s\n"
                + profile_summary(raw, top=15))


# -- report ------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(results: dict, args) -> str:
    out = ["", f"== records at scale: ours vs bare Falcon, {args.records:,} records over {args.clinics} clinics,"
               f" gunicorn gthread x {args.workers}, medians of {args.rounds} rounds x {args.duration}s ==",
           f"{'scenario':24}{'body B':>8}{'bare req/s':>12}{'ours req/s':>12}{'ratio':>7}{'ours p50':>10}"
           f"{'ours p99':>10}{'bare p99':>10}  targets"]
    for name in [f"page {f}" for f in PAGE_FILTERS] + ["stats"]:
        if name not in results:
            continue
        r = results[name]
        ours, bare = r["ours"], r["bare"]
        ratio = ours["rps"] / bare["rps"]
        if name == "stats":
            target = f"p99 <= {TARGETS['stats_p99_ms']:.0f} ms: {verdict(ours['p99_ms'] <= TARGETS['stats_p99_ms'])}"
        else:
            target = (f"p99 <= {TARGETS['page_p99_ms']:.0f} ms: {verdict(ours['p99_ms'] <= TARGETS['page_p99_ms'])};"
                      f" ratio >= {TARGETS['page_ratio']}: {verdict(ratio >= TARGETS['page_ratio'])}")
        errors = f"  (ours non-2xx {ours['non2xx']})" if ours["non2xx"] else ""
        out.append(f"{name:24}{r['bytes']:8d}{bare['rps']:12.1f}{ours['rps']:12.1f}{ratio:7.2f}{ours['p50_ms']:10.2f}"
                   f"{ours['p99_ms']:10.2f}{bare['p99_ms']:10.2f}  {target}{errors}")
    if "stats" in results:
        largest = results["stats"]["largest_ms"]
        out.append(f"{'stats, C0001 alone':24}{'':8}{'':12}{'':12}{'':7}{largest['p50']:10.2f}{largest['max']:>10.2f}"
                   f"{'':10}  (sequential; max shown as p99)")
    for mode in ("clinic", "mixed"):
        r = results.get(f"batch {mode}")
        if r:
            ours, bare = r["ours"], r["bare"]
            out.append(f"{'batch 1000, ' + mode:24}{'':8}{bare['rps']:12.1f}{ours['rps']:12.1f}"
                       f"{ours['rps'] / bare['rps']:7.2f}{ours['p50_ms']:10.2f}{ours['p99_ms']:10.2f}{bare['p99_ms']:10.2f}"
                       f"  ours {ours['rps'] * 1000:,.0f} records/s, target >= {TARGETS['batch_records_s']:,}:"
                       f" {verdict(ours['rps'] * 1000 >= TARGETS['batch_records_s'])}")
    r = results.get("export")
    if r:
        ok = r["ours"]["records_s"] >= TARGETS["export_records_s"]
        out.append(f"{'export C0001':24}{'':8}{'':12}{'':12}{r['ours']['records_s'] / r['bare']['records_s']:7.2f}"
                   f"  ours {r['ours']['records_s']:,.0f} records/s (bare {r['bare']['records_s']:,.0f}),"
                   f" {r['records']:,} records / {r['bytes'] / 1e6:.0f} MB a run;"
                   f" target >= {TARGETS['export_records_s']:,}: {verdict(ok)};"
                   f" worker VmHWM {r['peak_rss_mib_before']:.1f} -> {r['peak_rss_mib_after']:.1f} MiB")
    return "\n".join(out)


# -- main --------------------------------------------------------------------------------------

def add_database_arguments(p: argparse.ArgumentParser) -> None:
    """The seeded database and the batch load (bench_engines.py takes them too)."""
    p.set_defaults(timeout=10)
    p.add_argument("--db", default="/tmp/records-bench-1m.db", help="the seeded database (built when missing)")
    p.add_argument("--records", type=int, default=1_000_000, help="records in --db (a smaller one for a quick run)")
    p.add_argument("--clinics", type=int, default=500, help="clinics the records are spread over")
    p.add_argument("--batch-connections", type=int, default=8, help="wrk connections for batch ingest")
    p.add_argument("--tmpdir", default=None, help="where the working copy of the database and the logs go")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = load_arguments(__doc__, "bare/ours")
    add_database_arguments(p)
    p.add_argument("--scenarios", default="pages,stats,export,batch")
    p.add_argument("--profile", action="store_true", help="profile ours under py-spy during one more batch run")
    add_with_sql_argument(p)
    add_page_size_argument(p)
    args = parse_load_arguments(p, argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if set(args.scenarios) - {"pages", "stats", "export", "batch"}:
        p.error("--scenarios takes pages, stats, export, batch")
    if args.batch_connections < 1 or args.records < 1 or not 1 <= args.clinics <= 9999:
        p.error("--batch-connections and --records must be at least 1, --clinics 1 to 9999")
    args.all_runs = []  # every measured wrk run, for the noise warning and the JSON
    return args


def run(args: argparse.Namespace, wrk: str, tmp: Path, servers: list[Server]) -> int:
    """Steps 1 to 7 of the docstring, in `tmp`; every server it starts goes into `servers`."""
    source = Path(args.db)
    ensure_database(source, args.records, args.clinics, args.page_size)
    db = tmp / "records.db"
    shutil.copyfile(source, db)
    if args.with_sql:
        with_sql(db, args.with_sql)
        log_page_plans(db)
    base_env = clean_env()
    ours_env = {**base_env, "RECORDS_DB_PATH": str(db), "RECORDS_AUTH": "disabled", "RECORDS_LOG_LEVEL": "INFO"}
    server_settings(args, wrk, ours_env, tmp)
    log(f"working copy of the database: {db}")
    port = free_port()
    ours = Server("ours", gunicorn_argv(port, args.workers, None), ours_env, tmp / "ours.log", port)
    servers.append(ours)
    ours.start()

    results: dict = {}
    if "pages" in args.scenarios:
        bench_pages(wrk, ours, base_env, args, tmp, results, month_bounds(db))
    if "stats" in args.scenarios:
        bench_stats(wrk, ours, base_env, args, tmp, results)
    if "export" in args.scenarios:
        bench_export(ours, base_env, args, tmp, results)
    if "batch" in args.scenarios:
        bench_batch(wrk, ours, base_env, args, tmp, results, db, args.profile)
    finish(report(results, args), results, args.all_runs, args.quiet_below, "scale")
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_benchmark(args, "records-scale-", lambda wrk, tmp, servers: run(args, wrk, tmp, servers))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
