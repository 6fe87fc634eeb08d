"""Records at scale: records_service against the bare Falcon reference on 1,000,000 records.

    .venv/bin/python bench/bench_scale.py [--db /tmp/records-bench-1m.db] [--duration 10] [--rounds 3]
                                          [--scenarios pages,stats,export,batch] [--profile]

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
     goes first; prints medians, ratios and PASS/MISS against the issue's targets.
Every gunicorn it started is stopped at the end, on error and Ctrl-C too.
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
import tempfile
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from common import (BENCH_DIR, PY_SPY_NOTE, ROOT, BenchError, Server, describe_machine, ensure_wrk, free_port,
                    gunicorn_argv, gunicorn_config, log, measured_wrk, profile_summary, py_spy, py_spy_done,
                    run_figures, run_guarded, run_wrk)

sys.path.insert(0, str(ROOT))
from records_service import seed  # noqa: E402  (after the path: the package is not installed)

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


def ensure_database(path: Path, records: int, clinics: int) -> None:
    count = db_count(path)
    if count == records:
        log(f"database: {path} ({records:,} records, reused)")
        return
    if count is not None:
        raise BenchError(f"{path} holds {count:,} records, not {records:,}: remove it or pass another --db")
    cmd = [sys.executable, "-m", "records_service", "seed", "--records", str(records), "--clinics", str(clinics),
           "--random-seed", "1"]
    log(f"database: building {path} with: RECORDS_DB_PATH={path} {shlex.join(cmd)}")
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "RECORDS_DB_PATH": str(path)}, check=True,
                   stderr=subprocess.DEVNULL if not sys.stderr.isatty() else None)


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

def wrk_args(args, duration: int, script_args: list[str], connections: int | None) -> dict:
    return {"threads": args.threads, "connections": connections or args.connections, "duration": duration,
            "timeout": args.timeout, "script_args": script_args}


def alternate(wrk, script, servers: list[Server], args, script_args, connections=None) -> dict[str, list[dict]]:
    """Warm each server up, then --rounds rounds alternating which goes first (each after the
    machine has gone quiet, with the CPU it cost); every run, by app."""
    for server in servers:
        run_wrk(wrk, BENCH_DIR / script, server.url, **wrk_args(args, args.warmup, script_args, connections))
    runs: dict[str, list[dict]] = {server.name: [] for server in servers}
    for rnd in range(args.rounds):
        for server in servers if rnd % 2 == 0 else list(reversed(servers)):
            result, _ = measured_wrk(wrk, BENCH_DIR / script, server, servers, quiet_below=args.quiet_below,
                                     quiet_wait=args.quiet_wait,
                                     **wrk_args(args, args.duration, script_args, connections))
            runs[server.name].append(result)
            log(f"    {server.name:5} round {rnd + 1}: {run_figures(result)}")
    return runs


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs)
            for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "wrk_cpu_us_per_req", "cpu_other")} | {
        "non2xx": sum(r["non2xx"] for r in runs), "socket_errors": sum(r["socket_errors"] for r in runs),
        "rps_all": [round(r["rps"], 1) for r in runs]}


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
            runs = alternate(wrk, "scale_pages.lua", [bare, ours], args, [str(args.clinics), name, ",".join(values[name])])
            results[f"page {name}"] = {"bytes": size, "records": statistics.mean(counts),
                                       **{app: median_of(r) for app, r in runs.items()}}
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
        runs = alternate(wrk, "scale_stats.lua", [bare, ours], args, [str(args.clinics)])
    finally:
        bare.stop()
    largest = []
    for _ in range(20):
        started = time.perf_counter()
        get(ours, "/tests/_stats?clinic_id=C0001")
        largest.append((time.perf_counter() - started) * 1000)
    results["stats"] = {"bytes": size, **{app: median_of(r) for app, r in runs.items()},
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
            runs = alternate(wrk, "scale_batch.lua", [bare, ours], args, [str(args.clinics), mode, "1000"],
                             connections=args.batch_connections)
        finally:
            bare.stop()
        stored = db_count(db) - before
        requests = sum(r["requests"] for r in runs["ours"])
        results[f"batch {mode}"] = {app: median_of(r) for app, r in runs.items()} | {"stored": stored}
        log(f"    ours stored {stored:,} records in this scenario (warm-up included)")
        if stored < requests * 1000:
            raise BenchError(f"ours answered {requests} batches but stored only {stored:,} records")
        if profile and mode == "clinic":
            raw = tmp / "profile-batch.txt"
            spy = py_spy(ours, args.duration + 1, raw)
            result, _ = run_wrk(wrk, BENCH_DIR / "scale_batch.lua", ours.url,
                                **wrk_args(args, args.duration, [str(args.clinics), mode, "1000"], args.batch_connections))
            py_spy_done(spy, raw, timeout=args.duration + 60)
            log(f"\n[profile] batch ({mode}) on ours under py-spy ({PY_SPY_NOTE}): {result['rps'] * 1000:,.0f}"
                f" records/s\n" + profile_summary(raw, top=15))


# -- report ------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def cost_ratio(bare: dict, ours: dict) -> float:
    """What the req/s ratio would be if both were limited by CPU alone (server + wrk per request)."""
    return (bare["cpu_us_per_req"] + bare["wrk_cpu_us_per_req"]) / (ours["cpu_us_per_req"] + ours["wrk_cpu_us_per_req"])


def report(results: dict, args) -> str:
    out = ["", f"== records at scale: ours vs bare Falcon, {args.records:,} records over {args.clinics} clinics,"
               f" gunicorn sync x {args.workers}, medians of {args.rounds} rounds x {args.duration}s ==",
           f"{'scenario':22}{'body B':>7}{'bare r/s':>9}{'ours r/s':>9}{'ratio':>6}{'CPU-r':>6}{'ours p50':>9}"
           f"{'ours p99':>9}{'bare p99':>9}{'us/req':>7}{'other':>6}  targets"]

    def line(name: str, size, r: dict, target: str) -> str:
        ours, bare = r["ours"], r["bare"]
        return (f"{name:22}{size:>7}{bare['rps']:9.1f}{ours['rps']:9.1f}{ours['rps'] / bare['rps']:6.2f}"
                f"{cost_ratio(bare, ours):6.2f}{ours['p50_ms']:9.2f}{ours['p99_ms']:9.2f}{bare['p99_ms']:9.2f}"
                f"{ours['cpu_us_per_req']:7.0f}{ours['cpu_other']:6.2f}  {target}"
                + (f"  (ours non-2xx {ours['non2xx']})" if ours["non2xx"] else ""))

    for name in [f"page {f}" for f in PAGE_FILTERS]:
        if name in results:
            r = results[name]
            ratio = r["ours"]["rps"] / r["bare"]["rps"]
            out.append(line(name, r["bytes"], r, f"p99 <= {TARGETS['page_p99_ms']:.0f} ms: "
                            f"{verdict(r['ours']['p99_ms'] <= TARGETS['page_p99_ms'])}; ratio >= {TARGETS['page_ratio']}:"
                            f" {verdict(ratio >= TARGETS['page_ratio'])}"))
    if "stats" in results:
        r = results["stats"]
        out.append(line("stats", r["bytes"], r, f"p99 <= {TARGETS['stats_p99_ms']:.0f} ms: "
                        f"{verdict(r['ours']['p99_ms'] <= TARGETS['stats_p99_ms'])}"))
        largest = r["largest_ms"]
        out.append(f"{'stats, C0001 alone':22}{'':7}{'':9}{'':9}{'':6}{'':6}{largest['p50']:9.2f}{largest['max']:9.2f}"
                   f"  (20 sequential requests; max in the p99 column)")
    for mode in ("clinic", "mixed"):
        if f"batch {mode}" in results:
            r = results[f"batch {mode}"]
            records_s = r["ours"]["rps"] * 1000
            out.append(line(f"batch 1000, {mode}", "", r, f"ours {records_s:,.0f} records/s; >= "
                            f"{TARGETS['batch_records_s']:,}: {verdict(records_s >= TARGETS['batch_records_s'])}"))
    if "export" in results:
        r = results["export"]
        ok = r["ours"]["records_s"] >= TARGETS["export_records_s"]
        out.append(f"{'export C0001':22}  ours {r['ours']['records_s']:,.0f} records/s (bare {r['bare']['records_s']:,.0f}),"
                   f" {r['records']:,} records / {r['bytes'] / 1e6:.0f} MB a run; >= {TARGETS['export_records_s']:,}:"
                   f" {verdict(ok)}; ours' workers' VmHWM {r['peak_rss_mib_before']:.1f} -> {r['peak_rss_mib_after']:.1f} MiB")
    out += ["", "ratio: ours/bare req/s (medians). CPU-r: the CPU-cost ratio, bare/ours server+wrk CPU per request:",
            "what the ratio would be if both were limited by CPU alone (less sensitive to other load).",
            "us/req: CPU of ours' gunicorn processes per request. other: median cores used by other processes",
            f"during ours' runs (noise on a shared machine, {os.cpu_count()} cores in all)."]
    return "\n".join(out)


# -- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--db", default="/tmp/records-bench-1m.db", help="the seeded database (built when missing)")
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--clinics", type=int, default=500)
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of unrecorded load per app and scenario")
    p.add_argument("--rounds", type=int, default=3, help="bare/ours pairs per scenario; medians are reported")
    p.add_argument("--connections", type=int, default=16, help="wrk connections for pages and stats")
    p.add_argument("--batch-connections", type=int, default=8, help="wrk connections for batch ingest")
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--timeout", type=int, default=10, help="wrk request timeout, seconds")
    p.add_argument("--workers", type=int, default=None, help="gunicorn workers for both apps (default: the config's)")
    p.add_argument("--scenarios", default="pages,stats,export,batch")
    p.add_argument("--profile", action="store_true", help="profile ours under py-spy during one more batch run")
    p.add_argument("--quiet-below", type=float, default=0.25, metavar="CORES",
                   help="before each measured run, wait until other processes use less than this many cores")
    p.add_argument("--quiet-wait", type=int, default=30, metavar="SECONDS",
                   help="longest wait for that before running anyway (0: never wait)")
    p.add_argument("--tmpdir", default=None, help="where the working copy of the database and the logs go")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if set(args.scenarios) - {"pages", "stats", "export", "batch"}:
        p.error("--scenarios takes pages, stats, export, batch")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    log("command: " + shlex.join([os.path.relpath(sys.executable, Path.cwd()), *sys.argv]))
    wrk = ensure_wrk()
    tmp = Path(tempfile.mkdtemp(prefix="records-scale-", dir=args.tmpdir))
    servers: list[Server] = []

    def work() -> int:
        source = Path(args.db)
        ensure_database(source, args.records, args.clinics)
        db = tmp / "records.db"
        shutil.copyfile(source, db)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RECORDS_", "BENCH_"))}
        ours_env = {**base_env, "RECORDS_DB_PATH": str(db), "RECORDS_AUTH": "disabled", "RECORDS_LOG_LEVEL": "INFO"}
        settings = gunicorn_config(ours_env)
        args.workers = args.workers or int(settings["workers"])
        describe_machine(wrk, settings, args.workers)
        log(f"working copy of the database: {db}; server output in {tmp}/*.log")
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
        log(report(results, args))
        out = BENCH_DIR / "results" / ("scale-" + datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": [sys.executable, *sys.argv], "results": results}, indent=1))
        log(f"\nraw results: {out}")
        return 0

    try:
        return run_guarded(servers, work)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
