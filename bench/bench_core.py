"""Core benchmark: records_service against a bare Falcon app, same gunicorn, same load.

    .venv/bin/python bench/bench_core.py [--duration 10] [--connections 16] [--workers N]
                                         [--rounds 3] [--no-synchronous-compare] [--no-auth-compare]
                                         [--profile] [--ours-app MODULE:CALLABLE]    (see --help)

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
     With --auth-compare (the default) a third server, ours with RECORDS_AUTH=required on the
     same database ("ours-auth"), takes part in the same rounds; one API key (ingest and read,
     every clinic, made with keys.create_key) goes with every request to all three servers
     (BENCH_AUTHORIZATION, read by common.lua), so they receive the very same bytes;
  6. POST throughput of ours with RECORDS_SYNCHRONOUS=NORMAL against FULL, alternating;
  7. prints medians, ours/bare ratios and PASS/MISS against the targets (POST >= 0.60 of the
     bare app's requests/s with zero non-2xx, GET >= 0.50; ours-auth >= 0.90 of ours), and
     writes the raw runs as JSON to bench/results/ (git-ignored).
Every gunicorn it started is stopped at the end (SIGTERM, then wait), on error and Ctrl-C too.

The machine is shared: before each measured run the script waits (up to --quiet-wait s) for
other processes to go quiet, and every run line shows the CPU cores used by our servers, by
wrk and by everything else ("other"). Runs with "other" well above 0 are not comparable.
`--profile` adds py-spy samples of each server's workers (bare, ours and ours-auth) under each
load (after the measured runs), with Authenticate.process_resource's share on ours-auth;
bench/profile_app.py gives the cleaner per-request CPU breakdown of our app alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shlex
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import records_gen
from common import (BENCH_DIR, BenchError, Run, Server, add_page_size_argument, add_with_sql_argument, clean_env,
                    free_port, gunicorn_argv, load_arguments, log, measure, noisy_warning, pair_ratios,
                    parse_load_arguments, prefill, profile_summary, py_spy, py_spy_done, run_benchmark, server_settings,
                    summarise, with_sql, wrk_once)

TARGETS = {"POST": 0.60, "GET": 0.50}
AUTH_TARGET = 0.90  # ours-auth keeps at least 90% of ours' requests/s
SCRIPTS = {"POST": BENCH_DIR / "post_tests.lua", "GET": BENCH_DIR / "get_tests.lua"}
PROBE_CLINIC = "C9999"  # sizing probes go here, outside the 1,000 clinics the load uses


# -- ours with RECORDS_AUTH=required -------------------------------------------------------------

def start_with_auth(db_path: Path, workers: int, app: str | None, ours_env: dict, tmp: Path) -> Server:
    """Ours with RECORDS_AUTH=required on the same database, and one key that wrk sends to every
    server from now on (common.lua reads BENCH_AUTHORIZATION; the others ignore the header).
    The key is made as `keys create` makes it and never printed."""
    from records_service import keys
    from records_service.store.sqlite import SQLiteStore as Store

    store = Store(str(db_path))
    key_id, token = keys.create_key(store, name="bench", roles=["ingest", "read"], clinics=None,
                                    now=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"))
    store.close()
    os.environ["BENCH_AUTHORIZATION"] = f"Bearer {token}"  # wrk inherits this process's environment
    port = free_port()
    server = Server("ours-auth", gunicorn_argv(port, workers, app), {**ours_env, "RECORDS_AUTH": "required"},
                    tmp / "ours-auth.log", port)
    server.start()
    probe = "/tests?clinic_id=" + records_gen.clinic_id(1)
    statuses = (server.request("GET", probe, headers={"Authorization": f"Bearer {token}"})[0],
                server.request("GET", probe)[0])
    if statuses != (200, 401):
        raise BenchError(f"ours-auth answered {statuses} with and without the key, expected (200, 401)")
    log(f"ours-auth on {server.url} (pid {server.proc.pid}), RECORDS_AUTH=required, key {key_id}: "
        + shlex.join(server.argv))
    return server


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
    result = wrk_once(wrk, SCRIPTS[scenario], server.url, args, args.duration)
    py_spy_done(spy, raw, timeout=args.duration + 60)
    log(f"\n[profile] {scenario} /tests on {server.name} under py-spy (250 Hz, non-blocking; samples py-spy counts "
        f"as not idle, which include waits in socket calls): {result['rps']:.1f} req/s; raw stacks: {raw}")
    # On ours-auth, how much of the workers' CPU authentication takes: what it can cost req/s.
    focus = "Authenticate.process_resource" if server.name == "ours-auth" else None
    log(profile_summary(raw, top=args.profile_top, focus=focus))
    return raw


# -- report ----------------------------------------------------------------------------------

def verdict(ratio: float, target: float, non2xx: int) -> tuple[bool, str]:
    ok = ratio >= target and non2xx == 0
    why = ([f"ratio below {target:.2f}"] if ratio < target else []) + ([f"{non2xx} non-2xx"] if non2xx else [])
    return ok, f"target >= {target:.2f} with zero non-2xx: " + ("PASS" if ok else f"MISS ({', '.join(why)})")


def row(scenario: str, label: str, m: dict) -> str:
    return (f"{scenario:9}{label:10}{m['rps']:9.1f}{m['p50_ms']:9.2f}{m['p99_ms']:9.2f}{m['non2xx']:9d}"
            f"{m['socket_errors']:9d}{m['cpu_us_per_req']:11.0f}{m['cpu_other']:10.2f}   {m['rps_all']}")


def report(runs: list[Run], scenarios: list[str], sync_runs: list[Run], args, sizes, settings) -> tuple[str, bool]:
    out = []
    all_pass = True
    out.append("")
    out.append(f"== records_service vs bare Falcon: median of {args.rounds} rounds x {args.duration:g}s, "
               f"{args.connections} connections, {args.threads} wrk threads, gunicorn "
               f"{settings.get('worker_class')} x {args.workers} workers ==")
    out.append(f"   body bytes: POST {sizes[0]}, GET {sizes[1]} (ours, mean; bare answers exactly these)")
    header = (f"{'scenario':9}{'app':10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}"
              f"{'sock err':>9}{'CPU us/req':>11}{'other CPU':>10}   per-round req/s")
    out.append(header)
    out.append("-" * len(header))
    apps = ("bare", "ours", "ours-auth") if args.auth_compare else ("bare", "ours")
    medians = {}
    for scenario in scenarios:
        medians[scenario] = {app: summarise(runs, scenario, app, args.quiet_below) for app in apps}
        for app in apps:
            out.append(row(scenario, app, medians[scenario][app]))
    out.append("")
    for scenario in scenarios:
        s = medians[scenario]
        ratio = s["ours"]["rps"] / s["bare"]["rps"]
        ok, verdict_text = verdict(ratio, TARGETS[scenario], s["ours"]["non2xx"])
        all_pass &= ok
        pairs = pair_ratios(runs, scenario, "ours", "bare")
        out.append(f"{scenario:5} ours/bare: req/s {ratio:.3f}   p50 {s['ours']['p50_ms'] / s['bare']['p50_ms']:.2f}x"
                   f"   p99 {s['ours']['p99_ms'] / s['bare']['p99_ms']:.2f}x   {verdict_text}")
        cost = ((s["bare"]["cpu_us_per_req"] + s["bare"]["wrk_cpu_us_per_req"])
                / (s["ours"]["cpu_us_per_req"] + s["ours"]["wrk_cpu_us_per_req"]))
        out.append(f"      cross-checks: per-round ratios {pairs} (median {statistics.median(pairs):.3f}); "
                   f"CPU-cost ratio {cost:.3f} (bare/ours server+wrk CPU per request)")
        if s["ours"]["socket_errors"] or s["bare"]["socket_errors"]:
            out.append(f"      note: socket errors (connect/read/write/timeout): ours {s['ours']['socket_errors']},"
                       f" bare {s['bare']['socket_errors']}")
    if args.auth_compare:
        out.append("")
        out.append("== RECORDS_AUTH: ours-auth (required, a key looked up on every request) vs ours (disabled),"
                   " same rounds (rows above) ==")
        for scenario in scenarios:
            on, off = medians[scenario]["ours-auth"], medians[scenario]["ours"]
            ratio = on["rps"] / off["rps"]
            ok, verdict_text = verdict(ratio, AUTH_TARGET, on["non2xx"])
            all_pass &= ok
            pairs = pair_ratios(runs, scenario, "ours-auth", "ours")
            out.append(f"{scenario:5} auth/ours: req/s {ratio:.3f} ({100 * (ratio - 1):+.1f}%)   p50 "
                       f"{on['p50_ms'] / off['p50_ms']:.2f}x   p99 {on['p99_ms'] / off['p99_ms']:.2f}x   {verdict_text}")
            out.append(f"      cross-checks: per-round ratios {pairs} (median {statistics.median(pairs):.3f}); server "
                       f"CPU per request ours {off['cpu_us_per_req']:.0f} us, ours-auth {on['cpu_us_per_req']:.0f} us"
                       f" ({100 * (on['cpu_us_per_req'] / off['cpu_us_per_req'] - 1):+.1f}%)")
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
    warning = noisy_warning(runs + sync_runs, args.quiet_below)
    if warning:
        out.append(warning)
    out.append("CPU us/req: CPU time of the server's gunicorn processes per answered request (median of runs).")
    out.append("CPU-cost ratio: what the req/s ratio would be if both were limited only by CPU (server + wrk per "
               "request); less sensitive to other load than req/s.")
    out.append("other CPU: median cores used by processes other than our gunicorns and wrk during the runs "
               f"(noise on a shared machine; {os.cpu_count()} cores in all).")
    return "\n".join(out), all_pass


# -- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = load_arguments(__doc__, "bare/ours")
    p.add_argument("--scenarios", default="GET,POST", help="comma-separated, run in this order (GET first "
                   "keeps every page at 100 records)")
    p.add_argument("--synchronous-compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare POST throughput of ours with RECORDS_SYNCHRONOUS=NORMAL and FULL")
    p.add_argument("--auth-compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure ours with RECORDS_AUTH=required (a key on every request) in the same rounds")
    p.add_argument("--per-clinic", type=int, default=records_gen.RECORDS_PER_CLINIC,
                   help="records a clinic in the pre-fill (1,000 clinics: the Lua scripts pick among them)")
    p.add_argument("--tmpdir", default=None, help="where the temporary database and server logs go")
    p.add_argument("--keep-tmp", action="store_true", help="keep the database and server logs")
    p.add_argument("--profile", action="store_true",
                   help="after measuring, load each app once more per scenario under py-spy (needs "
                        "`.venv/bin/pip install py-spy`) and print the top functions")
    p.add_argument("--profile-top", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--ours-app", default=None, metavar="MODULE:CALLABLE",
                   help="run this app as ours instead of gunicorn.conf.py's wsgi_app (to try a change to the "
                        "service without editing it; MODULE is looked up in bench/ and the repository)")
    add_with_sql_argument(p)
    add_page_size_argument(p)
    p.add_argument("--json", default=None, help="write raw runs here (default bench/results/core-<time>.json)")
    p.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    args = parse_load_arguments(p, argv)
    args.scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenarios or set(args.scenarios) - set(SCRIPTS):
        p.error("--scenarios takes GET and/or POST")
    args.clinics = records_gen.CLINICS
    return args



def run(args: argparse.Namespace, wrk: str, tmp: Path, servers: list[Server]) -> int:
    """Steps 2 to 7 of the docstring, in `tmp`; every server it starts goes into `servers`."""
    base_env = clean_env()
    db_path = tmp / "records.db"
    ours_env = {**base_env, "RECORDS_DB_PATH": str(db_path), "RECORDS_AUTH": "disabled",
                "RECORDS_LOG_LEVEL": "INFO", "RECORDS_SYNCHRONOUS": "NORMAL"}
    settings = server_settings(args, wrk, ours_env, tmp)
    runs: list[Run] = []
    sync_runs: list[Run] = []

    total = args.clinics * args.per_clinic
    log(f"pre-filling {total:,} records over {args.clinics:,} clinics via Store.insert ...")
    log(f"  done in {prefill(db_path, args.clinics, args.per_clinic, args.page_size):.1f}s")
    if args.with_sql:
        with_sql(db_path, args.with_sql)

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

    compared = [bare, ours]
    if args.auth_compare:
        auth = start_with_auth(db_path, args.workers, args.ours_app, ours_env, tmp)
        servers.append(auth)
        compared.append(auth)
    for scenario in args.scenarios:
        log(f"\n{scenario} /tests: warm-up {args.warmup:g}s each, then {args.rounds} rounds")
        measure(wrk, scenario, SCRIPTS[scenario], compared, args, runs, all_servers=servers)
    if args.auth_compare:
        auth.stop()

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
        measure(wrk, "POST", SCRIPTS["POST"], [ours, full], args, sync_runs, all_servers=servers)
        ours.name = "ours"
        full.stop()

    text, all_pass = report(runs, args.scenarios, sync_runs, args, sizes, settings)
    log(text)

    if args.profile:
        if args.synchronous_compare:  # the bare app was stopped for the synchronous part
            bare.start()
        if args.auth_compare:  # stopped after its rounds, to leave the machine to the others
            auth.start()
        for scenario in args.scenarios:
            for server in compared:
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


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_benchmark(args, "records-bench-", lambda wrk, tmp, servers: run(args, wrk, tmp, servers),
                         keep_tmp=args.keep_tmp or args.profile)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
