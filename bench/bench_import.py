"""Import benchmark: where an import's time goes, beside `_batch` ingest of the same records.

    .venv/bin/python bench/bench_import.py [--items 100000] [--per-page 1000] [--profile]

1. makes --items upstream items (lab A's shape: nested patient, a value map for status) and
   serves them, pre-encoded, in pages of --per-page with `Link: rel="next"`, from a small HTTP
   server in a child process on a free loopback port (so it takes no CPU from the importer);
2. imports them into a new database (`imports.run.run_import`, the command's own code) and
   prints records/s; with --profile under cProfile, printing the share of the run's time spent
   inside the store's page transactions (`import_page`) and outside it (fetching, parsing,
   mapping, validating);
3. ingests the same records into another new database as `POST /tests/_batch` does, without
   HTTP: each record validated, then `Store.insert_batch` of 1,000 (one transaction each), and
   prints records/s.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing
import pstats
import sys
import tempfile
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import ROOT, log, log_command

from records_service.config import Settings
from records_service.imports.run import run_import
from records_service.imports.source import parse_source
from records_service.store import open_store
from records_service.validate import parse_batch, validate_record

SOURCE = {
    "name": "bench", "kind": "rest", "url": "", "records": "", "rate": 100000, "timeout": 30,
    "fields": {"test_id": "id", "clinic_id": "clinic", "patient_id": "patient.mrn", "test_type": "code",
               "result": "value", "unit": "unit", "status": "state", "collected_at": "collected",
               "notes": "comment"},
    "values": {"status": {"F": "final", "P": "preliminary"}},
}


def make_items(n: int) -> list[dict]:
    return [{"id": f"B-{i:07d}", "clinic": f"C{i % 50:03d}", "patient": {"mrn": f"P-{i % 9973}"},
             "code": ("HbA1c", "Glucose", "LDL")[i % 3], "value": round(4 + (i % 800) / 100, 2), "unit": "%",
             "state": "F" if i % 10 else "P", "collected": f"2025-05-{1 + i % 28:02d}T10:{i % 60:02d}:00+02:00",
             "comment": None if i % 7 else "fasting sample", "updated": f"{i:09d}"} for i in range(n)]


def serve(pages: list[bytes], ready) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            page = int(self.path.rpartition("page=")[2] or 1) if "page=" in self.path else 1
            body = pages[page - 1]
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if page < len(pages):
                self.send_header("Link", f'</items?page={page + 1}>; rel="next"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ready.send(server.server_address[1])
    server.serve_forever()


class TimedStore:
    """The store, with the wall time spent in its page transactions summed (no profiler's skew)."""

    def __init__(self, store) -> None:
        self._store = store
        self.page_s = 0.0

    def __getattr__(self, name):
        return getattr(self._store, name)

    def import_page(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self._store.import_page(*args, **kwargs)
        finally:
            self.page_s += time.perf_counter() - started


def import_once(port: int, db_path: str, profile: bool) -> tuple[float, dict, pstats.Stats | float]:
    """(seconds, the run's summary, the profile, or without one the seconds inside the store's pages)."""
    source = parse_source({**SOURCE, "url": f"http://127.0.0.1:{port}/items"}, {})
    store = TimedStore(open_store(Settings(db_path=db_path)))
    store.open()
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    outcome = run_import(source, store, now=lambda: datetime.now(timezone.utc), progress_stream=io.StringIO())
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - started
    store.close()
    return elapsed, outcome.summary, pstats.Stats(profiler) if profiler else store.page_s


def batch_once(items: list[dict], db_path: str, per_page: int) -> float:
    """What POST /tests/_batch does with the same items, mapped as the import maps them, minus HTTP:
    the strict parse of each body, the POST rules for each record, one transaction per body."""
    docs = [{"test_id": i["id"], "clinic_id": i["clinic"], "patient_id": i["patient"]["mrn"], "test_type": i["code"],
             "result": i["value"], "unit": i["unit"], "status": "final" if i["state"] == "F" else "preliminary",
             "collected_at": i["collected"], "notes": i["comment"]} for i in items]
    bodies = [json.dumps(docs[k:k + per_page]).encode() for k in range(0, len(docs), per_page)]
    store = open_store(Settings(db_path=db_path))
    store.open()
    started = time.perf_counter()
    for body in bodies:
        now = datetime.now(timezone.utc)
        batch = [validate_record(doc, now)[0] for doc in parse_batch(body, ndjson=False)]
        store.insert_batch(batch, request_id="bench-batch", now=now.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                           atomic=False)
    elapsed = time.perf_counter() - started
    store.close()
    return elapsed


# Where a run's time goes: (label, file path part, function name) of the calls that hold each part.
PARTS = (
    ("inside the store's page transactions", "store/sqlite/__init__", "import_page"),
    ("validating (the POST rules, as _batch does)", "validate.py", "validate_record"),
    ("mapping items (paths, value maps)", "imports/mapping", "map_item"),
    ("fetching and parsing pages", "imports/fetch", "fetch"),
)


def cumulative_s(stats: pstats.Stats, path_part: str, name: str) -> float:
    return sum(cumulative for (path, _, function), (_, _, _, cumulative, _) in stats.stats.items()
               if function == name and path_part in path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--per-page", type=int, default=1000)
    parser.add_argument("--profile", action="store_true", help="also run under cProfile: time inside/outside the store")
    args = parser.parse_args()
    log_command()
    items = make_items(args.items)
    pages = [json.dumps(items[k:k + args.per_page]).encode() for k in range(0, len(items), args.per_page)]
    receive, send = multiprocessing.Pipe(duplex=False)
    upstream = multiprocessing.Process(target=serve, args=(pages, send), daemon=True)
    upstream.start()
    port = receive.recv()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-import-") as scratch:
            elapsed, summary, inside = import_once(port, str(Path(scratch) / "import.db"), profile=False)
            assert summary["created"] == args.items, summary
            log(f"import: {args.items:,} items in pages of {args.per_page:,}: {elapsed:.2f}s, "
                f"{args.items / elapsed:,.0f} records/s; {inside / elapsed:.0%} of the wall time inside the "
                f"store's page transactions, {1 - inside / elapsed:.0%} outside")
            batch_s = batch_once(items, str(Path(scratch) / "batch.db"), args.per_page)
            log(f"_batch ingest of the same records (validate + insert_batch of {args.per_page:,}, no HTTP): "
                f"{batch_s:.2f}s, {args.items / batch_s:,.0f} records/s")
            if args.profile:
                elapsed, summary, stats = import_once(port, str(Path(scratch) / "profiled.db"), profile=True)
                total = stats.total_tt
                log(f"profiled import: {total:.2f}s (cProfile slows Python code: the shares matter, not the total)")
                for label, path_part, name in PARTS:
                    log(f"  {cumulative_s(stats, path_part, name) / total:4.0%} {label}")
                inside = cumulative_s(stats, *PARTS[0][1:])
                log(f"  {1 - inside / total:4.0%} outside the store in all")
                out = io.StringIO()
                stats.stream = out
                stats.sort_stats("cumulative").print_stats(18)
                log(out.getvalue())
    finally:
        upstream.terminate()


if __name__ == "__main__":
    sys.exit(main())
