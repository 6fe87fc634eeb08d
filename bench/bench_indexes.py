"""What each index costs an insert: our schema's insert path in SQLite alone, no HTTP, no Python validation.

    .venv/bin/python bench/bench_indexes.py [--records 1000000] [--clinics 500] [--chunk 1000]
                                            [--orders random,clinic] [--rounds 1] [--tmpdir DIR]
                                            [--with-sql SQL]

Batch ingest and seeding are bound by the SQL write (bench_scale.py's profile), and the issue
names SQLite's own rate as the reference: "about 200,000 rows/s in batches of 1,000". This
inserts --records rows made by `seed.seed_rows` (realistic records) into a fresh database at
today's schema, through `store.sqlite.records.insert_rows` (the insert every way of creating records uses,
with its clinic_counts and hourly_ingest upserts), in transactions of --chunk rows, WAL and
synchronous=NORMAL as served, with a 256 MiB page cache as `seed` uses. It does so once with
every index, and once with each secondary index dropped in turn, and for the schema's
minimum (the table and its UNIQUE test_id index only), with and without the counters: the
latter is the issue's reference, a plain table. Each figure is the median of --rounds.
It also times making the rows: the seed command makes a chunk, then inserts it, so its rate is
at most 1 / (1/making + 1/inserting).

`--orders` says in what order rows arrive: `random` as seed makes them (clinics interleaved, as
a clinic network's feed, or bench_scale's mixed batches), `clinic` grouped by clinic (each
transaction one clinic's records, as a lab's batch body, test_ids still rising in arrival order
as a lab numbers its results). The difference to "every index" is what that index costs a row.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from collections import deque
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

from common import add_with_sql_argument, log, log_command  # common puts the repository on sys.path
from records_service import seed
from records_service.store.sqlite.migrations import SCHEMA_VERSION, migrate
from records_service.store.sqlite.records import insert_rows

SECONDARY_INDEXES = ("records_by_patient", "records_by_request")
ORDERS = ("random", "clinic")


def in_order(rows: list[tuple], order: str) -> list[tuple]:
    """`rows` in `order`; grouped by clinic, they get new test_ids (same length) rising in arrival order."""
    if order == "random":
        return rows
    return [(f"seed-sorted-{n:08d}", *row[1:]) for n, row in enumerate(sorted(rows, key=lambda row: row[1]))]


def variants() -> dict[str, tuple[tuple[str, ...], bool]]:
    """Variant name -> (the indexes it drops, whether the counters are kept)."""
    return {"every index": ((), True), **{f"without {name}": ((name,), True) for name in SECONDARY_INDEXES},
            "table + test_id, counters": (SECONDARY_INDEXES, True),
            "table + test_id, no counters": (SECONDARY_INDEXES, False)}


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def insert_rate(path: Path, rows: list[tuple], drop: tuple[str, ...], counters: bool, chunk: int,
                extra_sql: str | None) -> float:
    """Rows per second inserting `rows` into a new database at `path` without the `drop` indexes,
    and without the counter upserts unless `counters`."""
    remove_database(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA cache_size = -262144")
        migrate(conn)
        if extra_sql:
            conn.executescript(extra_sql)
        for name in drop:
            conn.execute(f"DROP INDEX {name}")
        started = time.perf_counter()
        pending = iter(rows)
        while part := list(islice(pending, chunk)):
            conn.execute("BEGIN IMMEDIATE")
            insert_rows(conn, part, None)  # schema 8 counts no record in its insert: `counters` is moot
            conn.execute("COMMIT")
        return len(rows) / (time.perf_counter() - started)
    finally:
        conn.close()
        remove_database(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000, help="rows inserted per measurement")
    p.add_argument("--clinics", type=int, default=500, help="clinics the rows are spread over")
    p.add_argument("--chunk", type=int, default=1000, help="rows per transaction")
    p.add_argument("--orders", default="random,clinic", help=f"comma-separated, of {', '.join(ORDERS)}")
    p.add_argument("--rounds", type=int, default=1, help="measurements per variant; the median is reported")
    p.add_argument("--tmpdir", default=None, help="where the scratch database goes")
    add_with_sql_argument(p)  # run after migrating, in every variant
    args = p.parse_args()
    orders = args.orders.split(",")
    if set(orders) - set(ORDERS) or min(args.records, args.clinics, args.chunk, args.rounds) < 1:
        p.error("--orders takes random and/or clinic; --records, --clinics, --chunk, --rounds must be at least 1")

    log_command()
    log(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"SQLite {sqlite3.sqlite_version}, schema {SCHEMA_VERSION}")
    if args.with_sql:
        log(f"--with-sql, in every variant: {args.with_sql}")
    now = datetime.now(timezone.utc)
    started = time.perf_counter()
    deque(seed.seed_rows(args.records, args.clinics, now, rng_seed=1), maxlen=0)  # made and dropped, as seed does
    log(f"seed.seed_rows makes {args.records / (time.perf_counter() - started):,.0f} rows/s on its own "
        "(the seed command makes its rows and inserts them one after the other)")
    rows = list(seed.seed_rows(args.records, args.clinics, now, rng_seed=1))
    with tempfile.TemporaryDirectory(prefix="records-indexes-", dir=args.tmpdir) as tmp:
        path = Path(tmp) / "records.db"
        log(f"{args.records:,} seed rows over {args.clinics} clinics, {args.chunk:,} a transaction, in {tmp}\n")
        log(f"{'order':<8} {'variant':<30} {'rows/s':>10} {'us/row':>7} {'this index costs':>17}")
        for order in orders:
            ordered = in_order(rows, order)
            every = None
            for name, (drop, counters) in variants().items():
                rate = statistics.median(insert_rate(path, ordered, drop, counters, args.chunk, args.with_sql)
                                         for _ in range(args.rounds))
                every = every or 1e6 / rate
                cost = f"{every - 1e6 / rate:6.1f} us/row" if len(drop) == 1 else ""
                log(f"{order:<8} {name:<30} {rate:>10,.0f} {1e6 / rate:>7.1f} {cost:>17}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
