"""Core benchmark: records_service against a bare Falcon app, same gunicorn, same load.

    .venv/bin/python bench/bench_core.py [--duration 10] [--connections 16] [--workers N]
                                         [--rounds 3] [--no-synchronous-compare] [--profile]
                                         [--ours-app MODULE:CALLABLE]    (see --help)

One run on this machine:
  1. installs wrk (`apt-get install -y wrk`) when it is missing;
  2. pre-fills a temporary database with 100,000 records over 1,000 clinics (100 a clinic)
     through records_service.store.Store.insert (the store owns all SQL);
  3. starts our service (`gunicorn -c gunicorn.conf.py`, default INFO logging to a file, auth
     off, RECORDS_SYNCHRONOUS=NORMAL) and bench/bare_app.py under the very same gunicorn
     settings (same config file, only the app differs), each on a free loopback port;
  4. measures what our service answers (POST record, 100-record page) and has the bare app
     answer constant bodies of exactly those sizes;
  5. GET /tests?clinic_id=<random pre-filled clinic>, then POST /tests with unique ids into
     random existing clinics (GET first, so every page read is the 100-record page): each
     scenario as --rounds pairs of wrk runs, alternating bare/ours (and which one goes first),
     after a short warm-up of each;
  6. POST throughput of ours with RECORDS_SYNCHRONOUS=NORMAL against FULL, alternating;
  7. prints medians, ours/bare ratios and PASS/MISS against the targets (POST >= 0.60 of the
     bare app's requests/s with zero non-2xx, GET >= 0.50), and writes the raw runs as JSON
     to bench/results/ (git-ignored).
Every gunicorn it started is stopped at the end (SIGTERM, then wait), on error and Ctrl-C too.

The machine is shared: before each measured run the script waits (up to --quiet-wait s) for
other processes to go quiet, and every run line shows the CPU cores used by our servers, by
wrk and by everything else ("other"). Runs with "other" well above 0 are not comparable.
`--profile` adds py-spy samples of both apps' workers under each load (after the measured
runs); bench/profile_app.py gives the cleaner per-request CPU breakdown of our app alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import records_gen  # (bench/ is sys.path[0] when run as a script)
from common import (BENCH_DIR, PY_SPY_NOTE, ROOT, BenchError, Server, describe_machine, ensure_wrk, free_port,
                    fs_type, gunicorn_argv, gunicorn_config, log, measured_wrk, profile_summary, py_spy, py_spy_done,
                    run_figures, run_guarded)
from common import run_wrk as common_run_wrk

sys.path.insert(0, str(ROOT))  # records_service, for the pre-fill

TARGETS = {"POST": 0.60, "GET": 0.50}
SCRIPTS = {"POST": BENCH_DIR / "post_tests.lua", "GET": BENCH_DIR / "get_tests.lua"}
PROBE_CLINIC = "C9999"  # sizing probes go here, outside the 1,000 clinics the load uses


# -- pre-fill ----------------------------------------------------------------------------------

def prefill(db_path: Path, clinics: int, per_clinic: int) -> float:
    """Store clinics*per_clinic records through Store.insert, as the service stores them."""
    from records_service.store import Store
    from records_service.validate import validate_record

    started = time.perf_counter()
    store = Store(str(db_path), synchronous="NORMAL")
    store.open()
    now = datetime.now(timezone.utc)
    try:
        for n, doc in enumerate(records_gen.prefill_records(clinics, per_clinic)):
            record, errors = validate_record(doc, now)
            if errors:
                raise BenchError(f"generated record is invalid: {errors}")
            if n % 1000 == 0:
                now = datetime.now(timezone.utc)
                stamp = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
            store.insert(record, request_id=str(uuid.uuid4()), now=stamp)
        count = store.count()
    finally:
        store.close()
    if count != clinics * per_clinic:
        raise BenchError(f"pre-fill stored {count} records, expected {clinics * per_clinic}")
    return time.perf_counter() - started


# -- load ------------------------------------------------------------------------------------

@dataclass
class Run:
    scenario: str
    app: str
    round: int
    result: dict
    wrk_output: str = field(repr=False, default="")


def run_wrk(wrk: str, scenario: str, url: str, args: argparse.Namespace, duration: float) -> tuple[dict, str]:
    return common_run_wrk(wrk, SCRIPTS[scenario], url, **wrk_args(args, duration))


def wrk_args(args: argparse.Namespace, duration: float) -> dict:
    return {"threads": args.threads, "connections": args.connections, "duration": duration, "timeout": args.timeout}


def fmt_run(run: Run) -> str:
    return f"  {run.scenario:4} {run.app:12} round {run.round}: {run_figures(run.result)}"


def measure(wrk: str, scenario: str, servers: list[Server], args: argparse.Namespace, runs: list[Run],
            all_servers: list[Server]) -> None:
    """Warm each server up, then --rounds rounds, alternating which server goes first."""
    for server in servers:
        run_wrk(wrk, scenario, server.url, args, args.warmup)
    for rnd in range(1, args.rounds + 1):
        order = servers if rnd % 2 else list(reversed(servers))
        for server in order:
            result, output = measured_wrk(wrk, SCRIPTS[scenario], server, all_servers, quiet_below=args.quiet_below,
                                          quiet_wait=args.quiet_wait, **wrk_args(args, args.duration))
            run = Run(scenario, server.name, rnd, result, output)
            runs.append(run)
            log(fmt_run(run))


def summarise(runs: list[Run], scenario: str, app: str, quiet_below: float = 0.25) -> dict:
    mine = [r.result for r in runs if r.scenario == scenario and r.app == app]
    return {
        "noisy": sum(r["cpu_other"] >= quiet_below for r in mine),
        "runs": len(mine),
        "rps": statistics.median(r["rps"] for r in mine),
        "p50_ms": statistics.median(r["p50_ms"] for r in mine),
        "p99_ms": statistics.median(r["p99_ms"] for r in mine),
        "non2xx": sum(r["non2xx"] for r in mine),
        "socket_errors": sum(r["socket_errors"] for r in mine),
        "cpu_other": statistics.median(r["cpu_other"] for r in mine),
        "cpu_us_per_req": statistics.median(r["cpu_us_per_req"] for r in mine),
        "wrk_cpu_us_per_req": statistics.median(r["wrk_cpu_us_per_req"] for r in mine),
        "requests": sum(r["requests"] for r in mine),
        "rps_all": [round(r["rps"], 1) for r in mine],
    }


# -- sizing ------------------------------------------------------------------------------------

def measure_body_sizes(ours: Server, clinics: int, samples: int = 20) -> tuple[int, int]:
    """Mean size of what ours answers: a POST /tests record (probes stored in PROBE_CLINIC, so
    the load's clinics keep 100 records) and a GET /tests page of a pre-filled clinic."""
    rng = random.Random(7)
    post_sizes, get_sizes = [], []
    nonce = secrets.token_hex(4)
    for i in range(samples):
        # Thread number 99: never one of wrk's, so no clash with the load's ids.
        record = records_gen.make_record(records_gen.bench_test_id(nonce, 99, i + 1), PROBE_CLINIC, rng)
        status, body = ours.request("POST", "/tests", json.dumps(record).encode())
        if status != 201:
            raise BenchError(f"sizing POST answered {status}: {body[:500]!r}")
        post_sizes.append(len(body))
        clinic = records_gen.clinic_id(rng.randint(1, clinics))
        status, body = ours.request("GET", f"/tests?clinic_id={clinic}")
        if status != 200:
            raise BenchError(f"sizing GET answered {status}: {body[:500]!r}")
        get_sizes.append(len(body))
    return round(statistics.mean(post_sizes)), round(statistics.mean(get_sizes))


def check_bare_sizes(bare: Server, post_bytes: int, get_bytes: int) -> None:
    status, body = bare.request("POST", "/tests", b'{"test_id": "x"}')
    if status != 201 or len(body) != post_bytes:
        raise BenchError(f"bare POST answered {status} with {len(body)} bytes, expected 201 with {post_bytes}")
    status, body = bare.request("GET", "/tests?clinic_id=C0001")
    if status != 200 or len(body) != get_bytes:
        raise BenchError(f"bare GET answered {status} with {len(body)} bytes, expected 200 with {get_bytes}")


# -- profile (optional) ----------------------------------------------------------------------

def profile(wrk: str, scenario: str, server: Server, args: argparse.Namespace, out_dir: Path) -> Path:
    """Load `server` for --duration while py-spy samples all its workers (after the measured
    runs, so sampling does not disturb them); print where the workers' CPU time goes."""
    raw = out_dir / f"profile-{scenario.lower()}-{server.name}.txt"
    spy = py_spy(server, args.duration + 1, raw)
    result, _ = run_wrk(wrk, scenario, server.url, args, args.duration)
    py_spy_done(spy, raw, timeout=args.duration + 60)
    log(f"\n[profile] {scenario} /tests on {server.name} under py-spy ({PY_SPY_NOTE}): "
        f"{result['rps']:.1f} req/s; raw stacks: {raw}")
    log(profile_summary(raw, top=args.profile_top))
    return raw


# -- report ----------------------------------------------------------------------------------

def pair_ratios(runs: list[Run], scenario: str, num: str, den: str) -> list[float]:
    """num/den req/s of the two runs of each round (run back to back, so under similar noise)."""
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if r.scenario == scenario:
            by_round.setdefault(r.round, {})[r.app] = r.result["rps"]
    return [round(v[num] / v[den], 3) for _, v in sorted(by_round.items()) if num in v and den in v and v[den]]


def row(scenario: str, label: str, m: dict) -> str:
    return (f"{scenario:9}{label:7}{m['rps']:9.1f}{m['p50_ms']:9.2f}{m['p99_ms']:9.2f}{m['non2xx']:9d}"
            f"{m['socket_errors']:9d}{m['cpu_us_per_req']:11.0f}{m['cpu_other']:10.2f}   {m['rps_all']}")


def report(runs: list[Run], scenarios: list[str], sync_runs: list[Run], args, sizes, settings) -> tuple[str, bool]:
    out = []
    all_pass = True
    out.append("")
    out.append(f"== records_service vs bare Falcon: median of {args.rounds} rounds x {args.duration:g}s, "
               f"{args.connections} connections, {args.threads} wrk threads, gunicorn "
               f"{settings.get('worker_class')} x {args.workers} workers ==")
    out.append(f"   body bytes: POST {sizes[0]}, GET {sizes[1]} (ours, mean; bare answers exactly these)")
    header = (f"{'scenario':9}{'app':7}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}"
              f"{'sock err':>9}{'CPU us/req':>11}{'other CPU':>10}   per-round req/s")
    out.append(header)
    out.append("-" * len(header))
    ratios = {}
    for scenario in scenarios:
        s = {app: summarise(runs, scenario, app, args.quiet_below) for app in ("bare", "ours")}
        for app in ("bare", "ours"):
            m = s[app]
            out.append(row(scenario, app, m))
        ratio = s["ours"]["rps"] / s["bare"]["rps"]
        ratios[scenario] = (ratio, s, pair_ratios(runs, scenario, "ours", "bare"))
    out.append("")
    for scenario in scenarios:
        ratio, s, pairs = ratios[scenario]
        target = TARGETS[scenario]
        ok = ratio >= target and s["ours"]["non2xx"] == 0
        all_pass &= ok
        why = [] if ok else ([f"ratio below {target:.2f}"] if ratio < target else []) + (
            [f"{s['ours']['non2xx']} non-2xx"] if s["ours"]["non2xx"] else [])
        out.append(f"{scenario:5} ours/bare: req/s {ratio:.3f}   p50 {s['ours']['p50_ms'] / s['bare']['p50_ms']:.2f}x"
                   f"   p99 {s['ours']['p99_ms'] / s['bare']['p99_ms']:.2f}x   target >= {target:.2f} with zero"
                   f" non-2xx: {'PASS' if ok else 'MISS (' + ', '.join(why) + ')'}")
        cost = ((s["bare"]["cpu_us_per_req"] + s["bare"]["wrk_cpu_us_per_req"])
                / (s["ours"]["cpu_us_per_req"] + s["ours"]["wrk_cpu_us_per_req"]))
        out.append(f"      cross-checks: per-round ratios {pairs} (median {statistics.median(pairs):.3f}); "
                   f"CPU-cost ratio {cost:.3f} (bare/ours server+wrk CPU per request)")
        if s["ours"]["socket_errors"] or s["bare"]["socket_errors"]:
            out.append(f"      note: socket errors (connect/read/write/timeout): ours {s['ours']['socket_errors']},"
                       f" bare {s['bare']['socket_errors']}")
    if sync_runs:
        n = summarise(sync_runs, "POST", "ours-NORMAL", args.quiet_below)
        f = summarise(sync_runs, "POST", "ours-FULL", args.quiet_below)
        out.append("")
        out.append(f"== RECORDS_SYNCHRONOUS: POST /tests on ours, median of {args.rounds} rounds ==")
        out.append(header)
        out.append("-" * len(header))
        for label, m in (("NORMAL", n), ("FULL", f)):
            out.append(row("POST", label, m))
        pairs = pair_ratios(sync_runs, "POST", "ours-FULL", "ours-NORMAL")
        out.append(f"FULL/NORMAL: req/s {f['rps'] / n['rps']:.3f} (FULL serves {100 * (1 - f['rps'] / n['rps']):.1f}%"
                   f" fewer POSTs a second), p50 {f['p50_ms'] / n['p50_ms']:.2f}x, p99 {f['p99_ms'] / n['p99_ms']:.2f}x")
        out.append(f"      cross-checks: per-round ratios {pairs} (median {statistics.median(pairs):.3f}); CPU per "
                   f"request FULL {f['cpu_us_per_req']:.0f} us vs NORMAL {n['cpu_us_per_req']:.0f} us")
    out.append("")
    noisy = sum(r.result["cpu_other"] >= args.quiet_below for r in runs + sync_runs)
    if noisy:
        out.append(f"WARNING: {noisy} of {len(runs) + len(sync_runs)} runs had other processes using "
                   f">= {args.quiet_below:g} cores (see 'other' on each run line): req/s and ratios are not reliable.")
    out.append("CPU us/req: CPU time of the server's gunicorn processes per answered request (median of runs).")
    out.append("CPU-cost ratio: what the req/s ratio would be if both were limited only by CPU (server + wrk per "
               "request); less sensitive to other load than req/s.")
    out.append("other CPU: median cores used by processes other than our gunicorns and wrk during the runs "
               f"(noise on a shared machine; {os.cpu_count()} cores in all).")
    return "\n".join(out), all_pass


# -- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (whole seconds: wrk)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections")
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--workers", type=int, default=None,
                   help="gunicorn workers for both apps (default: what gunicorn.conf.py resolves to)")
    p.add_argument("--rounds", type=int, default=3, help="bare/ours pairs per scenario; medians are reported")
    p.add_argument("--warmup", type=int, default=2, help="seconds of unrecorded load per server and scenario")
    p.add_argument("--timeout", type=int, default=5, help="wrk request timeout, seconds")
    p.add_argument("--scenarios", default="GET,POST", help="comma-separated, run in this order (GET first "
                   "keeps every page at 100 records)")
    p.add_argument("--synchronous-compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare POST throughput of ours with RECORDS_SYNCHRONOUS=NORMAL and FULL")
    p.add_argument("--per-clinic", type=int, default=records_gen.RECORDS_PER_CLINIC,
                   help="records a clinic in the pre-fill (1,000 clinics: the Lua scripts pick among them)")
    p.add_argument("--tmpdir", default=None, help="where the temporary database and server logs go")
    p.add_argument("--keep-tmp", action="store_true", help="keep the database and server logs")
    p.add_argument("--profile", action="store_true",
                   help="after measuring, load each app once more per scenario under py-spy (needs "
                        "`.venv/bin/pip install py-spy`) and print the top functions")
    p.add_argument("--profile-top", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--quiet-below", type=float, default=0.25, metavar="CORES",
                   help="before each measured run, wait until other processes use less than this many cores")
    p.add_argument("--quiet-wait", type=int, default=30, metavar="SECONDS",
                   help="longest wait for that before running anyway (0: never wait)")
    p.add_argument("--ours-app", default=None, metavar="MODULE:CALLABLE",
                   help="run this app as ours instead of gunicorn.conf.py's wsgi_app (to try a change to the "
                        "service without editing it; MODULE is looked up in bench/ and the repository)")
    p.add_argument("--json", default=None, help="write raw runs here (default bench/results/core-<time>.json)")
    p.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    if min(args.duration, args.warmup, args.timeout, args.rounds, args.connections, args.threads) < 1:
        p.error("--duration, --warmup, --timeout, --rounds, --connections and --threads must be at least 1")
    args.scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenarios or set(args.scenarios) - set(SCRIPTS):
        p.error("--scenarios takes GET and/or POST")
    args.clinics = records_gen.CLINICS
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    log("command: " + shlex.join([os.path.relpath(sys.executable, Path.cwd()), *sys.argv]))
    wrk = ensure_wrk()

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RECORDS_") and not k.startswith("BENCH_")}
    tmp = Path(tempfile.mkdtemp(prefix="records-bench-", dir=args.tmpdir))
    db_path = tmp / "records.db"
    ours_env = {**base_env, "RECORDS_DB_PATH": str(db_path), "RECORDS_AUTH": "disabled",
                "RECORDS_LOG_LEVEL": "INFO", "RECORDS_SYNCHRONOUS": "NORMAL"}
    settings = gunicorn_config(ours_env)
    if args.workers is None:
        args.workers = int(settings["workers"])
    describe_machine(wrk, settings, args.workers)
    log(f"temp dir: {tmp} ({fs_type(tmp)}); server output in {tmp}/*.log")

    servers: list[Server] = []
    runs: list[Run] = []
    sync_runs: list[Run] = []

    def work() -> int:
        total = args.clinics * args.per_clinic
        log(f"pre-filling {total:,} records over {args.clinics:,} clinics via Store.insert ...")
        log(f"  done in {prefill(db_path, args.clinics, args.per_clinic):.1f}s")

        ours_port = free_port()
        ours = Server("ours", gunicorn_argv(ours_port, args.workers, args.ours_app), ours_env, tmp / "ours.log",
                      ours_port)
        servers.append(ours)
        ours.start()
        sizes = measure_body_sizes(ours, args.clinics)
        log(f"ours answers: POST /tests {sizes[0]} bytes, GET /tests ({args.per_clinic} records) {sizes[1]} bytes (means)")

        bare_env = {**base_env, "BENCH_POST_BODY_BYTES": str(sizes[0]), "BENCH_GET_BODY_BYTES": str(sizes[1]),
                    "BENCH_GET_RECORDS": str(args.per_clinic)}
        bare_port = free_port()
        bare = Server("bare", gunicorn_argv(bare_port, args.workers, "bare_app:create_app()"), bare_env,
                      tmp / "bare.log", bare_port)
        servers.append(bare)
        bare.start()
        check_bare_sizes(bare, *sizes)
        log(f"ours on {ours.url} (pid {ours.proc.pid}), bare on {bare.url} (pid {bare.proc.pid})")
        log("first command lines:\n  ours: " + shlex.join(ours.argv) + "\n  bare: " + shlex.join(bare.argv))

        for scenario in args.scenarios:
            log(f"\n{scenario} /tests: warm-up {args.warmup:g}s each, then {args.rounds} rounds")
            measure(wrk, scenario, [bare, ours], args, runs, servers)

        if args.synchronous_compare:
            bare.stop()
            full_port = free_port()
            full = Server("ours-FULL", gunicorn_argv(full_port, args.workers, args.ours_app),
                          {**ours_env, "RECORDS_SYNCHRONOUS": "FULL"}, tmp / "ours-full.log", full_port)
            servers.append(full)
            full.start()
            ours.name = "ours-NORMAL"
            log(f"\nRECORDS_SYNCHRONOUS NORMAL vs FULL, POST /tests: warm-up {args.warmup:g}s each, "
                f"then {args.rounds} rounds")
            measure(wrk, "POST", [ours, full], args, sync_runs, servers)
            ours.name = "ours"
            full.stop()

        text, all_pass = report(runs, args.scenarios, sync_runs, args, sizes, settings)
        log(text)

        if args.profile:
            if args.synchronous_compare:  # the bare app was stopped for the synchronous part
                bare.start()
            for scenario in args.scenarios:
                for server in (ours, bare):
                    profile(wrk, scenario, server, args, tmp)

        json_path = Path(args.json) if args.json else BENCH_DIR / "results" / (
            "core-" + datetime.now().strftime("%Y%m%d-%H%M%S") + f"-w{args.workers}.json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({
            "command": [sys.executable, *sys.argv], "args": {k: v for k, v in vars(args).items()},
            "body_bytes": {"POST": sizes[0], "GET": sizes[1]},
            "runs": [{"scenario": r.scenario, "app": r.app, "round": r.round, **r.result} for r in runs + sync_runs],
        }, indent=1))
        log(f"\nraw runs: {json_path}")
        return 0 if all_pass or not args.fail_on_miss else 1

    try:
        return run_guarded(servers, work)
    finally:
        if args.keep_tmp or args.profile:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
