"""Where our per-request time goes, without gunicorn, sockets or a load generator in the way.

    .venv/bin/python bench/profile_app.py [--requests 20000] [--scenarios GET,POST,BATCH]
                                          [--batches 30] [--batch-records 1000]
                                          [--cprofile] [--py-spy] [--top 25]

Calls the WSGI callables of records_service (`create_app()`, INFO logging as JSON lines to a
file, auth off, RECORDS_SYNCHRONOUS=NORMAL, a database pre-filled like bench_core.py's:
100,000 records over 1,000 clinics) and of bench/bare_app.py directly, one request after the
other in this process, and prints the CPU time per request of each and the difference: the
part of a request that is ours, with the gunicorn and kernel part (the same for both apps)
left out. BATCH is `POST /tests/_batch` with NDJSON bodies of `--batch-records` new records for
one clinic each (as bench_scale.py's batch scenario sends), `--batches` of them, against
bench/bare_scale_app.py; its figures are also given per record. `--cprofile` / `--py-spy` then
profile our app over the same requests and print the top functions (py-spy: sampled, low
overhead, sqlite3's C calls charged to the calling line; cProfile: exact call counts, inflates
many small Python calls).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging.config
import os
import pstats
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import records_gen
from common import (ROOT, add_page_size_argument, prefill, profile_summary,  # common also puts ROOT on sys.path
                    py_spy_binary)


def environ(method: str, path: str, query: str = "", body: bytes = b"") -> dict:
    content_type = "application/x-ndjson" if path == "/tests/_batch" else "application/json"
    return {
        "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "127.0.0.1:8000",
        "CONTENT_TYPE": content_type if body else "", "CONTENT_LENGTH": str(len(body)) if body else "",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
    }


def make_requests(scenario: str, n: int, clinics: int, batch_records: int = 1000) -> list[tuple[str, str, str, bytes]]:
    """The same requests the wrk scripts send: unique POST ids into random existing clinics,
    GETs of random pre-filled clinics, batches of new records for one random clinic each.
    Built before timing starts."""
    rng = random.Random(11)
    nonce = secrets.token_hex(4)
    if scenario == "BATCH":
        requests = []
        for b in range(n):
            clinic = records_gen.clinic_id(rng.randint(1, clinics))
            ids = (records_gen.bench_test_id(nonce, b % 100, b * batch_records + i) for i in range(batch_records))
            lines = (json.dumps(records_gen.make_record(test_id, clinic, rng)) for test_id in ids)
            requests.append(("POST", "/tests/_batch", "", ("\n".join(lines) + "\n").encode()))
        return requests
    if scenario == "GET":
        return [("GET", "/tests", f"clinic_id={records_gen.clinic_id(rng.randint(1, clinics))}", b"")
                for _ in range(n)]
    return [("POST", "/tests", "", json.dumps(records_gen.make_record(
        records_gen.bench_test_id(nonce, 0, i + 1), records_gen.clinic_id(rng.randint(1, clinics)), rng)).encode())
        for i in range(n)]


EXPECTED = {"GET": 200, "POST": 201, "BATCH": 200}  # a batch that is not atomic answers 200
PATHS = {"GET": "/tests", "POST": "/tests", "BATCH": "/tests/_batch"}


def drive(app, requests, expect: int) -> tuple[float, float]:
    """Run every request through the WSGI callable; return (CPU s, wall s)."""
    status_seen = []

    def start_response(status, headers, exc_info=None):
        status_seen.append(status)

    cpu, wall = time.process_time(), time.perf_counter()
    for method, path, query, body in requests:
        result = app(environ(method, path, query, body), start_response)
        b"".join(result)
        if hasattr(result, "close"):
            result.close()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    bad = [s for s in status_seen if not s.startswith(str(expect))]
    if bad:
        raise SystemExit(f"unexpected answers: {len(bad)} of {len(status_seen)}, e.g. {bad[0]}")
    return cpu, wall


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20000, help="requests per app and scenario")
    p.add_argument("--scenarios", default="GET,POST", help="of GET, POST, BATCH")
    p.add_argument("--batches", type=int, default=30, help="BATCH requests per app")
    p.add_argument("--batch-records", type=int, default=1000, help="records per BATCH request")
    p.add_argument("--per-clinic", type=int, default=records_gen.RECORDS_PER_CLINIC)
    p.add_argument("--cprofile", action="store_true", help="profile ours with cProfile")
    p.add_argument("--py-spy", action="store_true", help="profile ours with py-spy (attaches to this process)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--keep-tmp", action="store_true")
    add_page_size_argument(p)
    args = p.parse_args(argv)
    scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    clinics = records_gen.CLINICS

    tmp = Path(tempfile.mkdtemp(prefix="records-profile-"))
    try:
        db = tmp / "records.db"
        print(f"pre-filling {clinics * args.per_clinic:,} records ... ", end="", flush=True)
        print(f"{prefill(db, clinics, args.per_clinic, args.page_size):.1f}s")

        # Our app as gunicorn runs it: settings from the environment, JSON logs on stderr (a file).
        os.environ.update({"RECORDS_DB_PATH": str(db), "RECORDS_AUTH": "disabled", "RECORDS_LOG_LEVEL": "INFO",
                           "RECORDS_SYNCHRONOUS": "NORMAL"})
        from records_service.app import create_app
        from records_service.logs import logging_config
        log_file = open(tmp / "ours.log", "w", buffering=1)
        real_stderr, sys.stderr = sys.stderr, log_file
        try:
            logging.config.dictConfig(logging_config("INFO"))
        finally:
            sys.stderr = real_stderr
        ours = create_app()

        # Size the bare apps' bodies from ours' answers, as bench_core.py and bench_scale.py do.
        sized = {"POST": make_requests("POST", 50, clinics), "GET": make_requests("GET", 50, clinics)}
        if "BATCH" in scenarios:
            sized["BATCH"] = make_requests("BATCH", 2, clinics, args.batch_records)
        sizes = {}
        for s, reqs in sized.items():
            lengths = []
            for method, path, query, body in reqs:
                lengths.append(len(b"".join(ours(environ(method, path, query, body), lambda *a: None))))
            sizes[s] = round(sum(lengths) / len(lengths))
        os.environ.update({"BENCH_POST_BODY_BYTES": str(sizes["POST"]), "BENCH_GET_BODY_BYTES": str(sizes["GET"]),
                           "BENCH_GET_RECORDS": str(args.per_clinic),
                           "BENCH_BATCH_BODY_BYTES": str(sizes.get("BATCH", 50))})
        import bare_app
        import bare_scale_app
        bares = {"GET": bare_app.create_app(), "POST": bare_app.create_app()}
        bares["BATCH"] = bare_scale_app.create_app()

        def count(scenario: str) -> int:
            return args.batches if scenario == "BATCH" else args.requests

        def requests_of(scenario: str, n: int) -> list[tuple[str, str, str, bytes]]:
            return make_requests(scenario, n, clinics, args.batch_records)

        print(f"in-process WSGI calls, one at a time: {args.requests} requests per app for GET and POST, "
              f"{args.batches} of {args.batch_records} records for BATCH "
              f"(answer bytes {', '.join(f'{s} {n}' for s, n in sizes.items())})")
        print(f"{'scenario':9}{'app':6}{'CPU us/req':>12}{'wall us/req':>12}{'CPU us/record':>15}")
        for scenario in scenarios:
            expect = EXPECTED[scenario]
            n = count(scenario)
            per_record = args.batch_records if scenario == "BATCH" else 1
            row = {}
            for name, app in (("bare", bares[scenario]), ("ours", ours)):
                drive(app, requests_of(scenario, max(2, n // 40)), expect)  # warm-up
                cpu, wall = drive(app, requests_of(scenario, n), expect)
                row[name] = cpu
                print(f"{scenario:9}{name:6}{cpu * 1e6 / n:12.1f}{wall * 1e6 / n:12.1f}"
                      f"{cpu * 1e6 / (n * per_record):15.2f}")
            print(f"{scenario:9}{'diff':6}{(row['ours'] - row['bare']) * 1e6 / n:12.1f}"
                  f"   (ours/bare CPU {row['ours'] / row['bare']:.1f}x)")

        for scenario in scenarios:
            expect = EXPECTED[scenario]
            n = count(scenario)
            what = f"{scenario} {PATHS[scenario]}, {n} in-process requests"
            if args.py_spy:
                raw = tmp / f"profile-{scenario.lower()}.txt"
                requests = requests_of(scenario, n)
                spy = subprocess.Popen([py_spy_binary(), "record", "--pid", str(os.getpid()), "--nolineno", "--format", "raw",
                                        "--rate", "500", "--output", str(raw)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                time.sleep(1.5)
                drive(ours, requests, expect)
                spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
                spy.wait(30)
                print(f"\n[py-spy] ours, {what} ({raw})")
                print(profile_summary(raw, top=args.top))
            if args.cprofile:
                requests = requests_of(scenario, n)
                prof = cProfile.Profile()
                prof.enable()
                drive(ours, requests, expect)
                prof.disable()
                out = io.StringIO()
                stats = pstats.Stats(prof, stream=out)
                total = sum(v[2] for v in stats.stats.values())  # tottime sum
                print(f"\n[cProfile] ours, {what}: {total * 1e6 / n:.0f} us/req under the profiler")
                print(f"  {'tottime%':>8} {'cumtime%':>8} {'calls/req':>9}  function")
                rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:args.top]
                for (file, line, func), (cc, nc, tt, ct, _) in rows:
                    where = file.replace(str(ROOT) + "/", "")
                    where = where.split("site-packages/", 1)[-1].split("/lib/python3.11/", 1)[-1]
                    print(f"  {100 * tt / total:8.1f} {100 * ct / total:8.1f} {nc / n:9.1f}  "
                          f"{func} ({where}:{line})")
        return 0
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
