"""What one write costs the service's own SQLite store, in figures noise cannot move (issue 14, items 3-4).

    .venv/bin/python bench/bench_write_cost.py [--records 1000000] [--clinics 500] [--warm 1000] [--page-size BYTES]
                                                [--tmpdir DIR]

Seeds --records records over --clinics clinics through `SQLiteStore.bulk_insert` in key order (what
`seed` runs), then prints:
- bytes on disk per record (the database file after a full checkpoint, and the WAL);
- WAL frames per insert amortised over --warm (1,000) single-record inserts (`SQLiteStore.insert`, what
  POST /tests calls) into random clinics, with the counters' folds they cause (every second).
  A clinic's newest records land inside the clustered table, 500 places at once, and SQLite's
  rebalancing leaves that leaf nearly full again, so about one insert in three splits it (3
  more frames; bench_layouts.py --frames-clinic sees the same in steady ingest);
- then WAL frames of single-record inserts, each measured alone after a TRUNCATE checkpoint
  (folds off): median, mean and max of 200 into random clinics, and the frames by B-tree.
  Request IDs are random UUIDs, as the service makes them; test_ids random UUIDs, or with
  `--test-ids per-clinic` each clinic's own numbering in order (a lab's LIMS);
- WAL frames and commits per record when --threads threads (16, a worker's) each insert records
  at once (group commit: each commit carries the writes that waited for it), beside the same
  with each write committed alone (`common.write_alone`, as before group commit);
- WAL bytes and frames of one 1,000-record batch, for random clinics and for one clinic;
- the in-process time of correcting the record holding the largest clinic's earliest
  collected_at (median of 20), and its SQLite VM steps.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
from collections import Counter
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

# common puts the repository on sys.path
from common import (WAL_FRAME_HEADER, WAL_HEADER, add_page_size_argument, log, log_command, make_database,
                    wal_frames_and_commits, wal_page_owners, write_alone)
from records_service.seed import clinic_ids, seed_rows_in_key_order
from records_service.store.sqlite import SQLiteStore
import records_service.store.sqlite as sqlite_engine
from records_service.store.sqlite import connection as sqlite_connection


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID drawn from `rng`, as random as the service's own, repeated by a run with the same seed."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def record(test_id: str, clinic_id: str, collected_at: str = "2025-05-01T10:00:00Z", patient: str = "P-bench") -> dict:
    return {"test_id": test_id, "clinic_id": clinic_id, "patient_id": patient, "test_type": "HbA1c", "result": 5.4,
            "unit": "%", "status": "final", "collected_at": collected_at, "notes": None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--clinics", type=int, default=500)
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--test-ids", choices=("random", "per-clinic"), default="random",
                   help="the single inserts' test_ids: random UUIDs, or each clinic numbering its own in order")
    p.add_argument("--warm", type=int, default=1000,
                   help="single inserts (amortised figure) before the 200 measured alone: a seeded database's"
                        " indexes are packed full, and each leaf splits the first time an insert reaches it")
    p.add_argument("--threads", type=int, default=16, help="threads inserting at once (concurrent figure)")
    add_page_size_argument(p)
    args = p.parse_args()
    log_command()
    with tempfile.TemporaryDirectory(prefix="records-write-cost-", dir=args.tmpdir) as tmp:
        path = Path(tmp) / "records.db"
        make_database(path, args.page_size)
        store = SQLiteStore(str(path))
        started = time.perf_counter()
        for _ in store.bulk_insert(seed_rows_in_key_order(args.records, args.clinics, datetime.now(timezone.utc),
                                                                 rng_seed=1)):
            pass
        log(f"seeded {args.records:,} records over {args.clinics} clinics in {time.perf_counter() - started:.1f} s")
        conn = store._db.connection()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        size = os.path.getsize(path)
        log(f"bytes on disk per record: {size / args.records:,.0f} ({size:,} bytes, page size {page_size})")

        rng = random.Random(2)
        clinics = clinic_ids(args.clinics)
        numbered = Counter()

        def new_test_id(clinic: str) -> str:
            if args.test_ids == "random":
                return random_uuid(rng)
            numbered[clinic] += 1
            return f"{clinic}-T{numbered[clinic]:08d}"

        def insert_one(clinic: str) -> None:
            """What one POST /tests stores: the service makes a random (UUID 4) request ID."""
            store.insert(record(new_test_id(clinic), clinic, patient=f"P{rng.randrange(1, 100_000):06d}"),
                         request_id=random_uuid(rng),
                         now="2025-06-01T00:00:00.000Z")

        sqlite_engine.FOLD_EVERY_S = 1.0
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        total = 0
        for n in range(args.warm):
            before = os.path.getsize(f"{path}-wal")
            insert_one(rng.choice(clinics))
            total += (os.path.getsize(f"{path}-wal") - before) // (page_size + WAL_FRAME_HEADER)
            if os.path.getsize(f"{path}-wal") > 64 << 20:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        log(f"WAL frames per insert, amortised with the counters' folds over {args.warm:,} inserts: {total / args.warm:.2f}"
            " (appended frames; a WAL restart after a checkpoint rewrites from the start and is not counted)")

        # Each insert alone: the folds were measured above.
        sqlite_engine.FOLD_EVERY_S = sqlite_engine.FOLD_EVERY_RECORDS = float("inf")
        frames, by_object = [], Counter()
        for n in range(200):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            insert_one(rng.choice(clinics))
            owners = wal_page_owners(conn, path)
            frames.append(len(owners))
            by_object.update(owners)
        log(f"WAL frames of one single-record insert: median {statistics.median(frames)}, "
            f"mean {statistics.mean(frames):.2f}, max {max(frames)} (200 inserts); "
            f"{sum(1 for f in frames if f <= 4)} of them 4 or fewer")
        log("  frames per insert by B-tree: " + ", ".join(
            f"{name} {n / len(frames):.2f}" for name, n in by_object.most_common()))

        for grouped in (True, False):
            concurrent_frames(store, path, page_size, args.threads, grouped, clinics)
        for mixed in (True, False):
            batch_wal_bytes(store, path, page_size, clinics, mixed, rng)

        biggest = clinics[0]
        times, steps = [], []
        for n in range(20):
            test_id = f"bench-earliest-{n}"
            store.insert(record(test_id, biggest, "1990-01-01T00:00:00Z"), request_id="bench-e",
                         now="2025-06-01T00:00:00.000Z")
            store.migrate()  # fold it in: the correction then moves a counted record
            count = [0]
            conn.set_progress_handler(lambda: count.__setitem__(0, count[0] + 1), 1)
            started = time.perf_counter()
            store.correct(record(test_id, biggest, "2025-05-02T00:00:00Z"), expected=frozenset({1}),
                          request_id="bench-fix", now="2025-06-01T00:00:01.000Z")
            times.append((time.perf_counter() - started) * 1000)
            conn.set_progress_handler(None, 1)
            steps.append(count[0])
        in_clinic = store.clinic_stats(biggest)["total"]
        log(f"correcting the earliest record of a clinic of {in_clinic:,} records: median "
            f"{statistics.median(times):.2f} ms in-process, {statistics.median(steps):,} SQLite VM steps")
        store.close()
    return 0


def concurrent_frames(store: SQLiteStore, path: Path, page_size: int, threads: int, grouped: bool,
                      clinics: list[str]) -> None:
    """`threads` threads insert 50 records each at once, into random clinics, with random UUIDs;
    frames and commits counted from the WAL, started afresh and not checkpointed meanwhile."""
    per_thread = 50
    conn = store._db.connection()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    every = sqlite_connection.CHECKPOINT_EVERY_COMMITS
    sqlite_connection.CHECKPOINT_EVERY_COMMITS = float("inf")
    if not grouped:
        store._db.write = lambda work: write_alone(store._db, work)

    def run() -> None:
        for _ in range(per_thread):
            store.insert(record(str(uuid.uuid4()), random.choice(clinics), patient=f"P{random.randrange(100_000):06d}"),
                         request_id=str(uuid.uuid4()), now="2025-06-01T00:00:00.000Z")

    try:
        workers = [threading.Thread(target=run) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sqlite_connection.CHECKPOINT_EVERY_COMMITS = every
        vars(store._db).pop("write", None)
    frames, commits = wal_frames_and_commits(Path(f"{path}-wal"), page_size)
    records = threads * per_thread
    log(f"{threads} threads inserting at once, {'grouped' if grouped else 'each write committed alone'}: "
        f"{records:,} records in {commits:,} commits ({records / commits:.1f} a commit), "
        f"{frames / records:.2f} WAL frames a record")


def batch_wal_bytes(store: SQLiteStore, path: Path, page_size: int, clinics: list[str], mixed: bool,
                    rng: random.Random) -> None:
    """WAL bytes and frames of one 1,000-record `_batch` (`insert_batch`, folds off), each after a
    TRUNCATE checkpoint, for random clinics per record (a lab serving many clinics) or one clinic:
    what a larger page costs a write that touches many leaves."""
    conn = store._db.connection()
    sizes = []
    for n in range(12):
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        one = rng.choice(clinics)
        batch = [record(random_uuid(rng), rng.choice(clinics) if mixed else one,
                        patient=f"P{rng.randrange(1, 100_000):06d}") for _ in range(1000)]
        store.insert_batch(batch, request_id=random_uuid(rng),
                           now="2025-06-01T00:00:00.000Z", atomic=False)
        sizes.append(os.path.getsize(f"{path}-wal"))
    size = statistics.median(sizes)
    log(f"a batch of 1,000 records for {'random clinics' if mixed else 'one clinic'}: {size / 1e6:.2f} MB of WAL, "
        f"{(size - WAL_HEADER) // (page_size + WAL_FRAME_HEADER):,.0f} frames (median of 12)")


if __name__ == "__main__":
    raise SystemExit(main())
