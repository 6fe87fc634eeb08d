"""Record layouts side by side, in SQLite alone: bytes on disk, WAL frames per insert, page reads,
insert rates and migration time (issue 14, items 2, 3 and 7).

    .venv/bin/python bench/bench_layouts.py [--records 1000000] [--clinics 500] [--layouts A,B,C,D]
                                            [--frames-at 100000] [--inserts 20] [--queries 2000]
                                            [--chunk 1000] [--tmpdir DIR] [--page-size BYTES]

Layouts (each a script that turns schema 7's `records` into it, so the same script builds it on
a fresh database and migrates a loaded one):
  A  schema 7, release 0.1.0's (rowid table, covering clinic index that carries doc, patient
     index, request index, UNIQUE test_id; its insert and counters as tests/old_schemas.py
     keeps them);
  B  `records` WITHOUT ROWID clustered by PRIMARY KEY (clinic_id, seq), no created_at/updated_at
     columns (they are in doc), UNIQUE test_id index, (clinic_id, patient_id, seq), (request_id);
  C  schema 7's rowid table with a narrow (clinic_id, seq) clinic index: pages are read from the table;
  D  B without the request index (what that index costs in frames and bytes);
  8  the schema chosen (migration 8, store/sqlite/schema.sql): B plus key_id, inserted by the
     store's own `insert_rows`, its counters folded in outside the insert (so with and without
     counters are the same for it: the fold's frames are not counted here, see
     bench_write_cost.py); before its bytes are measured, one fold counts every loaded record.
In B and D there is no rowid to number records, so the insert supplies seq: microseconds since
the epoch at start, plus one per record (clinic order only needs seq rising within a clinic).

Per layout, in a fresh WAL database (synchronous=NORMAL, SQLite's default autocheckpoint, a
256 MiB page cache while loading, as `seed` uses), --records rows of `seed.seed_rows` are
loaded in transactions of --chunk rows with the counter upserts (clinic_counts, hourly_ingest),
each transaction one batch request with its own request_id, clinics interleaved as seed makes
them. Then:
  - bytes on disk per record after a TRUNCATE checkpoint (file size / records), and per object
    (dbstat); for B, C, D also the used bytes per record once rebuilt from a loaded A;
  - WAL frames of one single-record insert when --frames-at records are loaded: TRUNCATE
    checkpoint, insert a new record (a random test_id and request_id, as a POST has) of a
    random existing clinic in one transaction, frames = (WAL size - 32) / (page size + 24);
    the median of --inserts, with and without the counter upserts;
  - a page of 100 (`select_records`, the service's query, LIMIT 101) of a uniformly random
    clinic, unfiltered and filtered by patient_id, test_type, status or a month of
    collected_at (values taken from a random record of that clinic): median and p99 over
    --queries per filter, on two connections with the service's settings, one with
    `PRAGMA mmap_size` = 1 GiB, queries alternating between them after a warm-up pass; and
    each query's EXPLAIN QUERY PLAN (it must be a SEARCH, never a SCAN);
  - insert rates: the load above (clinics interleaved in every transaction), and a second
    load into a fresh database with the rows grouped by clinic (each transaction one clinic's
    records, test_ids rising, as bench_indexes' `clinic` order);
  - the migration from a loaded A (copied): the layout's script in one transaction
    (`INSERT INTO new SELECT ... ORDER BY clinic_id, seq`, drop, rename, indexes), then its
    TRUNCATE checkpoint.
Two cores shared with other agents: the times are noisy (the load average is logged); frames
and bytes are deterministic.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import count
from pathlib import Path
from typing import Callable, Iterator

from bench_indexes import in_order, remove_database
from common import log, log_command, wal_page_owners  # common puts the repository on sys.path
from records_service import seed
from records_service.store.sqlite import counters
from records_service.store.sqlite.migrations import MIGRATIONS, migrate
from records_service.store.sqlite.records import insert_rows, select_records
from records_service.validate import utc_millis
from tests.old_schemas import COUNT_SQL, HOURLY_SQL, INSERT_SQL as INSERT_7, old_row

LOAD_CACHE_KIB = 262_144
MMAP_BYTES = 1 << 30
PAGE = 100
FILTERS = ("none", "patient_id", "test_type", "status", "month")

_CLUSTERED_COLUMNS = "seq, clinic_id, test_id, patient_id, test_type, status, collected_at, version, request_id, doc"
_CLUSTERED_INSERT_SQL = f"INSERT INTO records ({_CLUSTERED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?)"


def clustered_script(request_index: bool) -> str:
    """Today's records table rebuilt WITHOUT ROWID in (clinic_id, seq) order, its rows kept."""
    return f"""
    CREATE TABLE records_clustered (
        seq          INTEGER NOT NULL,
        clinic_id    TEXT NOT NULL,
        test_id      TEXT NOT NULL,
        patient_id   TEXT NOT NULL,
        test_type    TEXT NOT NULL,
        status       TEXT NOT NULL,
        collected_at TEXT NOT NULL,
        version      INTEGER NOT NULL,
        request_id   TEXT NOT NULL,
        doc          TEXT NOT NULL,
        PRIMARY KEY (clinic_id, seq)
    ) WITHOUT ROWID;
    INSERT INTO records_clustered ({_CLUSTERED_COLUMNS})
        SELECT {_CLUSTERED_COLUMNS} FROM records ORDER BY clinic_id, seq;
    DROP TABLE records;
    ALTER TABLE records_clustered RENAME TO records;
    CREATE UNIQUE INDEX records_by_test_id ON records (test_id);
    CREATE INDEX records_by_patient ON records (clinic_id, patient_id, seq);
    {"CREATE INDEX records_by_request ON records (request_id);" if request_index else ""}
    """


@dataclass(frozen=True)
class Layout:
    name: str
    summary: str
    from_today: str  # SQL turning migration 7's records into this layout, rows kept
    insert: Callable[[sqlite3.Connection, list[tuple], Iterator[int]], None]  # NewRow-shaped rows
    schema_7_counters: bool = True  # counted in the insert's transaction, as schema 7 did
    fold_after_load: bool = False  # count the loaded records into schema 8's counters before measuring bytes


def insert_as_schema_7(conn: sqlite3.Connection, rows: list[tuple], seqs: Iterator[int]) -> None:
    conn.executemany(INSERT_7, map(old_row, rows))


def insert_clustered(conn: sqlite3.Connection, rows: list[tuple], seqs: Iterator[int]) -> None:
    conn.executemany(_CLUSTERED_INSERT_SQL, [(next(seqs), r[1], r[0], r[2], r[3], r[4], r[5], r[7], r[8]) for r in rows])


def insert_as_store(conn: sqlite3.Connection, rows: list[tuple], seqs: Iterator[int]) -> None:
    insert_rows(conn, rows, key_id=None)


LAYOUTS = {layout.name: layout for layout in (
    Layout("A", "schema 7 (release 0.1.0)", "", insert_as_schema_7),
    Layout("B", "WITHOUT ROWID (clinic_id, seq), request index", clustered_script(request_index=True),
           insert_clustered),
    Layout("C", "rowid table, narrow (clinic_id, seq) index",
           "DROP INDEX records_by_clinic; CREATE INDEX records_by_clinic ON records (clinic_id, seq);",
           insert_as_schema_7),
    Layout("D", "B without the request index", clustered_script(request_index=False), insert_clustered),
    Layout("8", "schema 8 as chosen, counters folded later", MIGRATIONS[8], insert_as_store, schema_7_counters=False,
           fold_after_load=True),
)}


# -- rows ----------------------------------------------------------------------------------------

def batches(rows: list[tuple], chunk: int) -> list[list[tuple]]:
    """`rows` in transactions of `chunk`, each a batch request with a request_id of its own."""
    out = []
    for start in range(0, len(rows), chunk):
        request_id = str(uuid.uuid4())
        out.append([with_request_id(row, request_id) for row in rows[start:start + chunk]])
    return out


def with_request_id(row: tuple, request_id: str) -> tuple:
    return (*row[:7], request_id, row[8].replace(f'"request_id": "{row[7]}"', f'"request_id": "{request_id}"'))


def post_rows(records: int, clinics: int, rng_seed: int, clinic: str | None = None) -> list[tuple]:
    """Single records as POST /tests makes them: a client's test_id, the request's own id, now;
    of random clinics (weighted as seed weighs them), or all of `clinic`."""
    out = []
    made = seed.seed_rows(records * (clinics if clinic else 1), clinics, datetime.now(timezone.utc),
                          rng_seed=rng_seed, run="post")
    for row in (row for row in made if clinic in (None, row[1])):
        if len(out) == records:
            break
        test_id = f"lab-{uuid.uuid4().hex[:16]}"
        row = (test_id, *row[1:8], row[8].replace(f'"test_id": "{row[0]}"', f'"test_id": "{test_id}"'))
        out.append(with_request_id(row, str(uuid.uuid4())))
    return out


def insert(conn: sqlite3.Connection, layout: Layout, rows: list[tuple], seqs: Iterator[int], counters: bool) -> None:
    """The layout's insert of NewRow-shaped `rows`, and with `counters` schema 7's counter upserts."""
    layout.insert(conn, rows, seqs)
    if counters and layout.schema_7_counters:
        count_as_schema_7(conn, rows)


def count_as_schema_7(conn: sqlite3.Connection, rows: list[tuple]) -> None:
    """Release 0.1.0's counting in the insert's transaction: one upsert per clinic, test type and
    status of the rows into clinic_counts, one per hour of created_at into hourly_ingest."""
    groups: dict[tuple[str, str, str], list] = {}
    hours: dict[str, int] = {}
    for row in rows:
        key, collected, hour = (row[1], row[3], row[4]), row[5], row[6][:13]
        group = groups.setdefault(key, [0, collected, collected])
        group[0] += 1
        group[1] = min(group[1], collected)
        group[2] = max(group[2], collected)
        hours[hour] = hours.get(hour, 0) + 1
    conn.executemany(COUNT_SQL, [(*key, *group) for key, group in groups.items()])
    conn.executemany(HOURLY_SQL, hours.items())


# -- databases -----------------------------------------------------------------------------------

def open_database(path: Path, cache_kib: int | None = None, mmap_bytes: int = 0,
                  page_size: int | None = None) -> sqlite3.Connection:
    """A connection as the service opens one (WAL, synchronous=NORMAL), with a page cache and mmap if
    given; a new file gets `page_size` (None: SQLite's default)."""
    conn = sqlite3.connect(path, isolation_level=None)
    if page_size:
        conn.execute(f"PRAGMA page_size = {int(page_size)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    if cache_kib:
        conn.execute(f"PRAGMA cache_size = -{cache_kib}")
    if mmap_bytes:
        got = conn.execute(f"PRAGMA mmap_size = {mmap_bytes}").fetchone()[0]
        if got != mmap_bytes:
            raise RuntimeError(f"mmap_size is {got}, not {mmap_bytes}")
    return conn


def build(path: Path, layout: Layout, page_size: int | None) -> sqlite3.Connection:
    remove_database(path)
    conn = open_database(path, LOAD_CACHE_KIB, page_size=page_size)
    migrate(conn, upto=7)
    conn.executescript(f"BEGIN IMMEDIATE; {layout.from_today} COMMIT;")
    return conn


def checkpoint(conn: sqlite3.Connection) -> None:
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if busy:
        raise RuntimeError("the TRUNCATE checkpoint was blocked")


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of pages in use: the file's size once vacuumed."""
    pages, free, size = (conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count", "page_size"))
    return (pages - free) * size


def bytes_by_object(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT name, pgsize FROM dbstat WHERE aggregate = TRUE ORDER BY pgsize DESC"))


@dataclass
class Frames:
    counts: list[float]  # per insert
    by_object: dict[str, int]  # frames over all inserts, by the object their page belongs to


def wal_frames(conn: sqlite3.Connection, path: Path, layout: Layout, rows: list[tuple], seqs: Iterator[int],
               counters: bool) -> Frames:
    """WAL frames written by each of `rows` inserted alone in its own transaction after a TRUNCATE checkpoint."""
    frames = Frames([], {})
    for row in rows:
        checkpoint(conn)
        conn.execute("BEGIN IMMEDIATE")
        insert(conn, layout, [row], seqs, counters)
        conn.execute("COMMIT")
        owners = wal_page_owners(conn, path)
        frames.counts.append(len(owners))
        for owner in owners:
            frames.by_object[owner] = frames.by_object.get(owner, 0) + 1
    return frames


# -- measurements --------------------------------------------------------------------------------

@dataclass
class Figures:
    records: int = 0
    file_bytes: int = 0
    objects: dict | None = None
    frames: dict | None = None  # counters: bool -> Frames
    frames_at: int = 0
    pages: dict | None = None  # (filter, mmap) -> list of ns
    plans: dict | None = None  # filter -> plan lines
    rate_interleaved: float = 0.0
    rate_by_clinic: float = 0.0
    migrate_s: tuple[float, float] | None = None  # transaction, checkpoint
    migrated_used_bytes: int = 0


def load(path: Path, layout: Layout, chunks: list[list[tuple]], posts: list[tuple], frames_at: int,
         seqs: Iterator[int], figures: Figures, page_size: int | None) -> None:
    """Load `chunks`; when `frames_at` rows are in, measure single inserts' WAL frames (untimed)."""
    conn = build(path, layout, page_size)
    try:
        loaded, elapsed, total = 0, 0.0, sum(map(len, chunks))
        half = len(posts) // 2
        for chunk in chunks:
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            insert(conn, layout, chunk, seqs, counters=True)
            conn.execute("COMMIT")
            elapsed += time.perf_counter() - started
            loaded += len(chunk)
            if figures.frames is None and (loaded >= frames_at or loaded == total):
                figures.frames_at = loaded
                figures.frames = {True: wal_frames(conn, path, layout, posts[:half], seqs, counters=True),
                                  False: wal_frames(conn, path, layout, posts[half:], seqs, counters=False)}
        figures.rate_interleaved = loaded / elapsed
        figures.records = loaded + len(posts)
        if layout.fold_after_load:
            conn.execute("BEGIN IMMEDIATE")
            counters.fold(conn)
            conn.execute("COMMIT")
        checkpoint(conn)
        figures.file_bytes = path.stat().st_size
        figures.objects = bytes_by_object(conn)
    finally:
        conn.close()


def insert_rate(path: Path, layout: Layout, chunks: list[list[tuple]], seqs: Iterator[int],
                page_size: int | None) -> float:
    conn = build(path, layout, page_size)
    try:
        started = time.perf_counter()
        for chunk in chunks:
            conn.execute("BEGIN IMMEDIATE")
            insert(conn, layout, chunk, seqs, counters=True)
            conn.execute("COMMIT")
        return sum(map(len, chunks)) / (time.perf_counter() - started)
    finally:
        conn.close()
        remove_database(path)


def page_queries(rows: list[tuple], queries: int, rng_seed: int) -> dict[str, list[tuple[str, list]]]:
    """Per filter, `queries` first pages of uniformly random clinics, filter values from a random record of the clinic."""
    rng = random.Random(rng_seed)
    by_clinic: dict[str, list[int]] = {}
    for n, row in enumerate(rows):
        by_clinic.setdefault(row[1], []).append(n)
    clinics = sorted(by_clinic)
    out = {}
    for kind in FILTERS:
        out[kind] = []
        for _ in range(queries):
            clinic = rng.choice(clinics)
            row = rows[rng.choice(by_clinic[clinic])]
            filters = {"clinic_id": clinic}
            if kind in ("patient_id", "test_type", "status"):
                filters[kind] = row[("patient_id", "test_type", "status").index(kind) + 2]
            elif kind == "month":
                year, month = int(row[5][:4]), int(row[5][5:7])
                filters["collected_from"] = f"{year:04d}-{month:02d}-01T00:00:00Z"
                filters["collected_to"] = f"{year + month // 12:04d}-{month % 12 + 1:02d}-01T00:00:00Z"
            out[kind].append(select_records(filters, 0, PAGE + 1))
    return out


def read_pages(path: Path, queries: dict[str, list[tuple[str, list]]], figures: Figures) -> None:
    """Time every query on a plain and an mmap connection, alternating which goes first, after a warm-up pass."""
    conns = {False: open_database(path), True: open_database(path, mmap_bytes=MMAP_BYTES)}
    try:
        figures.plans = {kind: [row[3] for row in conns[False].execute("EXPLAIN QUERY PLAN " + sql, params)]
                         for kind, [(sql, params), *_] in queries.items()}
        for kind, batch in queries.items():
            for sql, params in batch:
                for conn in conns.values():
                    conn.execute(sql, params).fetchall()
        figures.pages = {}
        for kind, batch in queries.items():
            for mmap in (False, True):
                figures.pages[kind, mmap] = []
            for n, (sql, params) in enumerate(batch):
                for mmap in ((False, True) if n % 2 else (True, False)):
                    started = time.perf_counter_ns()
                    conns[mmap].execute(sql, params).fetchall()
                    figures.pages[kind, mmap].append(time.perf_counter_ns() - started)
    finally:
        for conn in conns.values():
            conn.close()


def migrate_from_today(source: Path, path: Path, layout: Layout, figures: Figures) -> None:
    """Copy the loaded A database (schema 7), run the layout's script on it in one transaction, then checkpoint."""
    remove_database(path)
    shutil.copyfile(source, path)
    conn = open_database(path, LOAD_CACHE_KIB)
    try:
        records = conn.execute("SELECT count(*) FROM records").fetchone()[0]
        started = time.perf_counter()
        conn.executescript(f"BEGIN IMMEDIATE; {layout.from_today} COMMIT;")
        middle = time.perf_counter()
        checkpoint(conn)
        figures.migrate_s = (middle - started, time.perf_counter() - middle)
        if conn.execute("SELECT count(*) FROM records").fetchone()[0] != records:
            raise RuntimeError(f"layout {layout.name} lost records in its migration")
        figures.migrated_used_bytes = used_bytes(conn)
    finally:
        conn.close()
        remove_database(path)


# -- report --------------------------------------------------------------------------------------

def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(figures: dict[str, Figures], args: argparse.Namespace) -> None:
    names = list(figures)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cell) -> None:
        rows.append((label, [cell(figures[name]) for name in names]))

    row(f"bytes/record on disk, loaded ({args.records:,})", lambda f: f"{f.file_bytes / f.records:,.0f}")
    row("bytes/record used, rebuilt from A", lambda f: f"{f.migrated_used_bytes / f.records:,.0f}"
        if f.migrated_used_bytes else "-")
    frames_at = next(iter(figures.values())).frames_at
    for counters in (True, False):
        label = f"WAL frames/insert at {frames_at:,}, {'with' if counters else 'without'} counters (med, mean, range)"
        row(label, lambda f, c=counters: f"{statistics.median(f.frames[c].counts):g}, "
                                         f"{statistics.mean(f.frames[c].counts):.1f}, "
                                         f"{min(f.frames[c].counts):g}-{max(f.frames[c].counts):g}")
    for kind in FILTERS:
        for mmap in (False, True):
            label = f"page us, {kind if kind != 'none' else 'no filter'}{', mmap 1 GiB' if mmap else ''} (med / p99)"
            row(label, lambda f, k=kind, m=mmap: f"{statistics.median(f.pages[k, m]) / 1000:,.0f} / "
                                                f"{percentile(f.pages[k, m], 0.99) / 1000:,.0f}")
    row("insert rows/s, 1,000 interleaved a txn", lambda f: f"{f.rate_interleaved:,.0f}")
    row("insert rows/s, 1,000 of one clinic a txn", lambda f: f"{f.rate_by_clinic:,.0f}")
    row("migration from A s (txn + checkpoint)", lambda f: f"{f.migrate_s[0]:.1f} + {f.migrate_s[1]:.1f}"
        if f.migrate_s else "-")

    width = max(len(label) for label, _ in rows)
    cell = max(14, *(len(c) for _, cells in rows for c in cells))
    log("\n" + " " * width + "".join(f" {name:>{cell}}" for name in names))
    for label, cells in rows:
        log(f"{label:<{width}}" + "".join(f" {c:>{cell}}" for c in cells))

    log("\nbytes per record by object (dbstat, as loaded):")
    for name in names:
        f = figures[name]
        log(f"  {name}: " + ", ".join(f"{obj} {size / f.records:,.0f}" for obj, size in f.objects.items()
                                      if size / f.records >= 1))
    log(f"\nWAL frames per single insert by object (mean of {args.inserts} inserts at {frames_at:,} records):")
    for name in names:
        for counters in (True, False):
            frames = figures[name].frames[counters]
            log(f"  {name} {'with' if counters else 'without'} counters: " + ", ".join(
                f"{obj} {n / len(frames.counts):.2f}" for obj, n in sorted(frames.by_object.items(), key=lambda i: -i[1])))
    log("\nEXPLAIN QUERY PLAN of each page query:")
    for name in names:
        for kind, plan in figures[name].plans.items():
            verdict = "ok" if all(line.startswith("SEARCH ") for line in plan) else "NOT AN INDEX SEARCH"
            log(f"  {name} {kind:<10} {' | '.join(plan)}  [{verdict}]")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000, help="records loaded in each layout")
    p.add_argument("--clinics", type=int, default=500, help="clinics the records are spread over")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    p.add_argument("--frames-at", type=int, default=100_000, help="records loaded when single inserts' frames are counted")
    p.add_argument("--inserts", type=int, default=20, help="single inserts per frame count (median), each of with and without counters")
    p.add_argument("--queries", type=int, default=2000, help="page queries per filter and mmap setting")
    p.add_argument("--chunk", type=int, default=1000, help="rows per transaction while loading")
    p.add_argument("--tmpdir", default=None, help="where the scratch databases go")
    p.add_argument("--page-size", type=int, default=None,
                   help="page size of every database made (default: SQLite's, 4096)")
    p.add_argument("--frames-clinic", default=None, metavar="CLINIC",
                   help="every single insert into this clinic (e.g. C0001, the largest): a clinic's steady state, "
                        "rather than the first insert into each of many clinics after the load")
    p.add_argument("--no-migration", action="store_true", help="skip the migrations from a loaded A (and A's load when A is not listed)")
    args = p.parse_args()
    names = args.layouts.split(",")
    if set(names) - set(LAYOUTS) or min(args.records, args.clinics, args.frames_at, args.inserts, args.queries,
                                        args.chunk) < 1:
        p.error(f"--layouts takes {', '.join(LAYOUTS)}; the numbers must be at least 1")

    log_command()
    log(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"SQLite {sqlite3.sqlite_version}")
    rows = list(seed.seed_rows(args.records, args.clinics, datetime.now(timezone.utc), rng_seed=1))
    interleaved = batches(rows, args.chunk)
    by_clinic = batches(in_order(rows, "clinic"), args.chunk)
    posts = post_rows(2 * args.inserts, args.clinics, rng_seed=2, clinic=args.frames_clinic)
    queries = page_queries(rows, args.queries, rng_seed=3)
    seqs = count(time.time_ns() // 1000)
    figures = {name: Figures() for name in names}
    with tempfile.TemporaryDirectory(prefix="records-layouts-", dir=args.tmpdir) as tmp:
        today = Path(tmp) / "A.db"
        log(f"{args.records:,} seed rows over {args.clinics} clinics, {args.chunk:,} a transaction, in {tmp}")
        for name in names:
            layout, f = LAYOUTS[name], figures[name]
            path = Path(tmp) / f"{name}.db"
            log(f"{name}: {layout.summary}: loading ({utc_millis(datetime.now(timezone.utc))}, "
                f"load average {os.getloadavg()[0]:.2f})")
            load(path, layout, interleaved, posts, args.frames_at, seqs, f, args.page_size)
            log(f"{name}: {f.rate_interleaved:,.0f} rows/s, {f.file_bytes / f.records:,.0f} bytes/record; reading pages")
            read_pages(path, queries, f)
            if name == "A":
                today = path
            else:
                remove_database(path)
            log(f"{name}: loading by clinic")
            f.rate_by_clinic = insert_rate(Path(tmp) / f"{name}-by-clinic.db", layout, by_clinic, seqs, args.page_size)
        if not args.no_migration:
            if not today.exists():
                log("A: loading, to migrate from")
                load(today, LAYOUTS["A"], interleaved, posts, args.frames_at, seqs, Figures(), args.page_size)
            for name in names:
                if name != "A":
                    log(f"{name}: migrating from a loaded A")
                    migrate_from_today(today, Path(tmp) / f"{name}-migrated.db", LAYOUTS[name], figures[name])
        log(f"done, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    report(figures, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
