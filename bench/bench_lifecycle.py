"""Lifecycle benchmark: what keeping every version of every record costs writes, and what a
single-record read and a correction sustain.

    .venv/bin/python bench/bench_lifecycle.py [--duration 10] [--connections 16] [--threads 2]
                                              [--workers N] [--rounds 3] [--per-clinic 200]

One run on this machine:
  1. installs wrk (`apt-get install -y wrk`) when it is missing;
  2. pre-fills a temporary database with 1,000 clinics x --per-clinic records through
     Store.insert (common.prefill), copies it with SQLite's backup API and, in the copy only,
     drops what keeps history (the trigger records_keep_superseded, which copies a version into
     record_versions when a correction supersedes it, and the index records_by_request, which
     /audit reads current versions by): "no-history" is the very same service on the same data,
     storing only the current version;
  3. starts the service on each database (`gunicorn -c gunicorn.conf.py`, INFO logs to a file,
     auth off, the same settings), each on a free loopback port;
  4. POST /tests (post_tests.lua) and PUT /tests/{id} (put_record.lua: every request corrects a
     different pre-filled record at If-Match "1", so every answer should be 200; each run has
     its own block of records) as --rounds pairs of wrk runs, alternating which goes first,
     after a warm-up of each; then GET /tests/{id} (get_record.lua, random pre-filled records)
     on the service with history;
  5. prints medians, and history/no-history ratios for POST and PUT.
Before each measured run it waits for other processes to go quiet and records the CPU each run
used, as bench_core.py does (common.measure: --quiet-below, --quiet-wait); each run line shows it.
Every gunicorn it started is stopped at the end (SIGTERM, then wait), on error and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import shlex
import sqlite3
import sys
from pathlib import Path

import records_gen
from common import (BENCH_DIR, Run, Server, clean_env, free_port, gunicorn_argv, load_arguments, log, measure,
                    noisy_warning, parse_load_arguments, prefill, run_benchmark, server_settings, summarise)

# Scenario name -> Lua script (POST: bench_core's; PUT1 and GET1: one record by id).
SCRIPTS = {"POST": BENCH_DIR / "post_tests.lua", "PUT1": BENCH_DIR / "put_record.lua",
           "GET1": BENCH_DIR / "get_record.lua"}
WITHOUT_HISTORY = ("DROP TRIGGER records_keep_superseded", "DROP INDEX records_by_request")


def without_history(db_path: Path, copy_path: Path) -> None:
    """A consistent copy of the database without what keeps history (bench only)."""
    with sqlite3.connect(db_path) as src, sqlite3.connect(copy_path) as dst:
        src.backup(dst)
        for statement in WITHOUT_HISTORY:
            dst.execute(statement)
    src.close()
    dst.close()


def write_identities(path: Path, clinics: int, per_clinic: int) -> None:
    """Line n: clinic_id and patient_id of pre-filled record n, which a correction must repeat."""
    with open(path, "w") as out:
        for record in records_gen.prefill_records(clinics, per_clinic):
            out.write(f"{record['clinic_id']} {record['patient_id']}\n")


def report(runs: list[Run], args: argparse.Namespace) -> str:
    header = (f"{'scenario':26}{'app':12}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>9}"
              f"{'sock err':>10}   per-round req/s")
    out = ["", f"== lifecycle: median of {args.rounds} rounds x {args.duration}s, {args.connections} connections, "
               f"{args.threads} wrk threads, {args.workers} sync workers ==", header, "-" * len(header)]
    labels = {"POST": "POST /tests", "PUT1": "PUT /tests/{id} (correct)", "GET1": "GET /tests/{id}"}
    for scenario, apps in (("POST", ("history", "no-history")), ("PUT1", ("history", "no-history")),
                           ("GET1", ("history",))):
        for app in apps:
            m = summarise(runs, scenario, app, args.quiet_below)
            out.append(f"{labels[scenario]:26}{app:12}{m['rps']:10.1f}{m['p50_ms']:10.2f}{m['p99_ms']:10.2f}"
                       f"{m['non2xx']:9d}{m['socket_errors']:10d}   {m['rps_all']}")
    out.append("")
    for scenario in ("POST", "PUT1"):
        kept, bare = (summarise(runs, scenario, app, args.quiet_below) for app in ("history", "no-history"))
        ratio = kept["rps"] / bare["rps"]
        out.append(f"{labels[scenario]:26} history/no-history: req/s {ratio:.3f} ({100 * (ratio - 1):+.1f}%),"
                   f" p50 {kept['p50_ms'] / bare['p50_ms']:.2f}x, p99 {kept['p99_ms'] / bare['p99_ms']:.2f}x")
    warning = noisy_warning(runs, args.quiet_below)
    if warning:
        out.append(warning)
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = load_arguments(__doc__, "history/no-history")
    p.add_argument("--per-clinic", type=int, default=200,
                   help="pre-filled records per clinic (1,000 clinics); PUT corrects each once, so each "
                        "of the --rounds + 1 runs needs as many as it makes PUTs (~30,000 in 10 s)")
    p.add_argument("--tmpdir", default=None, help="where the temporary databases and server logs go")
    return parse_load_arguments(p, argv)


def run(args: argparse.Namespace, wrk: str, tmp: Path, servers: list[Server]) -> int:
    """Steps 2 to 5 of the docstring, in `tmp`; every server it starts goes into `servers`."""
    env = {**clean_env(), "RECORDS_AUTH": "disabled", "RECORDS_LOG_LEVEL": "INFO", "RECORDS_SYNCHRONOUS": "NORMAL"}
    server_settings(args, wrk, env, tmp)
    runs: list[Run] = []
    total = records_gen.CLINICS * args.per_clinic
    log(f"pre-filling {total:,} records via Store.insert ...")
    log(f"  done in {prefill(tmp / 'history.db', records_gen.CLINICS, args.per_clinic):.1f}s")
    without_history(tmp / "history.db", tmp / "no-history.db")
    identities = tmp / "identities.txt"
    write_identities(identities, records_gen.CLINICS, args.per_clinic)

    for name in ("history", "no-history"):
        port = free_port()
        server = Server(name, gunicorn_argv(port, args.workers, None),
                        {**env, "RECORDS_DB_PATH": str(tmp / f"{name}.db")}, tmp / f"{name}.log", port)
        servers.append(server)
        server.start()
        log(f"{name}: {shlex.join(server.argv)}  (RECORDS_DB_PATH={tmp / f'{name}.db'})")

    log(f"\nPOST /tests: warm-up {args.warmup}s each, then {args.rounds} rounds")
    measure(wrk, "POST", SCRIPTS["POST"], servers, args, runs)

    block = total // (args.rounds + 1)  # warm-up + rounds runs per server, each on its own records
    next_first = {server.name: 1 for server in servers}

    def put_args(server: Server) -> list[str]:
        first = next_first[server.name]
        next_first[server.name] += block
        return [str(first), str(args.threads), str(identities)]

    log(f"\nPUT /tests/{{id}}: {block:,} records per run; warm-up {args.warmup}s each, then {args.rounds} rounds")
    measure(wrk, "PUT1", SCRIPTS["PUT1"], servers, args, runs, put_args)

    log(f"\nGET /tests/{{id}} on history: warm-up {args.warmup}s, then {args.rounds} rounds")
    measure(wrk, "GET1", SCRIPTS["GET1"], servers[:1], args, runs, lambda server: [str(total)],
            all_servers=servers)

    log(report(runs, args))
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_benchmark(args, "records-bench-lifecycle-", lambda wrk, tmp, servers: run(args, wrk, tmp, servers))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
