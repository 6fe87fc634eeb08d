"""How long migration 8 takes on a schema-7 database of --records records (issue 14, item 6).

    .venv/bin/python bench/bench_migration.py [--records 1000000] [--clinics 500] [--tmpdir DIR]

Builds a schema-7 database as release 0.1.0 left it (the migrations of that time, its rowid
table and covering index, counters kept by its insert), then times `migrate` to the current
schema in one process, as gunicorn's master does in `on_starting` before any worker exists.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

from common import log, log_command  # common puts the repository on sys.path
from records_service.seed import seed_rows
from records_service.store.sqlite.migrations import SCHEMA_VERSION, migrate

# Release 0.1.0's insert (schema 7), frozen here as tests/old_schemas.py keeps it.
INSERT_7 = ("INSERT INTO records (test_id, clinic_id, patient_id, test_type, status, collected_at, created_at,"
            " updated_at, version, request_id, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--clinics", type=int, default=500)
    p.add_argument("--tmpdir", default=None)
    args = p.parse_args()
    log_command()
    with tempfile.TemporaryDirectory(prefix="records-migration-", dir=args.tmpdir) as tmp:
        path = Path(tmp) / "v7.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA cache_size = -262144")
        migrate(conn, upto=7)
        started = time.perf_counter()
        rows = seed_rows(args.records, args.clinics, datetime.now(timezone.utc), rng_seed=1)
        while chunk := list(islice(rows, 50_000)):
            conn.execute("BEGIN")
            conn.executemany(INSERT_7, [(*row[:7], row[6], *row[7:]) for row in chunk])
            conn.execute("COMMIT")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO clinic_counts SELECT clinic_id, test_type, status, count(*), min(collected_at),"
                     " max(collected_at) FROM records GROUP BY 1, 2, 3")
        conn.execute("INSERT INTO hourly_ingest SELECT substr(created_at, 1, 13), count(*) FROM records GROUP BY 1")
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        log(f"built schema 7 with {args.records:,} records in {time.perf_counter() - started:.1f} s: "
            f"{os.path.getsize(path) / args.records:,.0f} bytes a record")

        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        started = time.perf_counter()
        migrate(conn)
        took = time.perf_counter() - started
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log(f"migrated 7 -> {SCHEMA_VERSION} in {took:.1f} s; now {os.path.getsize(path) / args.records:,.0f} bytes a record;"
            f" integrity {conn.execute('PRAGMA integrity_check').fetchone()[0]}")
        conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
