"""How fast `seed` fills an empty SQLite database (issue 14, item 8: >= 100,000 records/s at 1,000,000).

    .venv/bin/python bench/bench_seed.py --records 1000000 [--clinics 500] [--runs 3] [--baseline CHECKOUT]

First --runs runs of the command itself, each into a new empty database in a temporary directory:
`python -m records_service seed --records N --clinics C`, printing for each its records/s (as the
command reports it: from the start of the load to the database closed), the wall time of the whole
process and its CPU time, user + system, of the command and the process it starts to make rows
(the machine is shared: CPU time is the figure other agents move least). Then the medians. With
--baseline, the same command of another checkout (say /work/main, the code before this loader)
runs after each of ours, with this venv's Python, so both meet the same load.

Then one run in this process, through the same calls (`seed.rows_made_in_another_process`,
`SQLiteStore.bulk_insert`, `close`), timed phase by phase, wall and this process's CPU:
- waiting for the first rows (the child draws every row's random numbers before the first);
- appending the rows to the records table (the child formats the next rows meanwhile);
- building the three secondary indexes;
- counting them in (`counters.count_in`: clinic_counts, hourly_ingest, clinic_marks from the
  tallies, clinic_times by one sorted INSERT ... SELECT);
- the commit, and closing (the last connection copies the WAL into the database);
with the CPU time of the child that made the rows.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from common import ROOT, log, log_command  # common puts the repository on sys.path
from records_service.seed import rows_made_in_another_process, seed_rows_in_key_order
from records_service.store.sqlite import SQLiteStore, counters


def cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def command_run(path: Path, records: int, clinics: int, repo: Path = ROOT) -> tuple[float, float, float]:
    """(records/s as the command reports it, wall s, CPU s) of one `seed` command of the checkout `repo`."""
    env = {**os.environ, "RECORDS_DB_PATH": str(path), "PYTHONPATH": str(repo)}
    cpu_before, started = cpu_s(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "records_service", "seed", "--records", str(records),
                           "--clinics", str(clinics)], cwd=path.parent, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, cpu_s(resource.RUSAGE_CHILDREN) - cpu_before
    if done.returncode != 0:
        raise SystemExit(f"seed failed ({done.returncode}): {done.stderr[-2000:]}")
    rate = float(re.search(r"\(([\d,]+) records/s\)", done.stdout).group(1).replace(",", ""))
    return rate, wall, cpu


class Phases:
    """Wall and this process's CPU between named marks."""

    def __init__(self) -> None:
        self.marks = [("start", time.perf_counter(), cpu_s(resource.RUSAGE_SELF))]

    def mark(self, name: str) -> None:
        self.marks.append((name, time.perf_counter(), cpu_s(resource.RUSAGE_SELF)))

    def report(self, records: int) -> None:
        for (_, wall0, cpu0), (name, wall1, cpu1) in zip(self.marks, self.marks[1:]):
            log(f"  {name:<44} {wall1 - wall0:7.2f} s wall {cpu1 - cpu0:7.2f} s CPU"
                f" ({(cpu1 - cpu0) / records * 1e6:5.2f} us a record)")
        wall, cpu = self.marks[-1][1] - self.marks[0][1], self.marks[-1][2] - self.marks[0][2]
        log(f"  {'whole load, this process':<44} {wall:7.2f} s wall {cpu:7.2f} s CPU: {records / wall:,.0f} records/s")


def phased_run(path: Path, records: int, clinics: int) -> None:
    count_in = counters.count_in
    store = SQLiteStore(str(path))
    store.migrate()
    children_before = cpu_s(resource.RUSAGE_CHILDREN)
    phases = Phases()

    def timed_count_in(conn, tally):
        phases.mark("building the secondary indexes")
        count_in(conn, tally)
        phases.mark("counting them in (counters.count_in)")

    counters.count_in = timed_count_in
    try:
        rows = rows_made_in_another_process(seed_rows_in_key_order, records, clinics, datetime.now(timezone.utc))
        for done in store.bulk_insert(rows):
            if len(phases.marks) == 1:
                phases.mark("the first chunk (rows drawn, then appended)")
            if done == records:
                phases.mark("appending the other rows to records")
        phases.mark("commit")
        store.close()
        phases.mark("close (WAL copied into the database)")
    finally:
        counters.count_in = count_in
    phases.report(records)
    child = cpu_s(resource.RUSAGE_CHILDREN) - children_before
    log(f"  {'the child making the rows':<44} {'':>7}   {'':>5}    {child:7.2f} s CPU"
        f" ({child / records * 1e6:5.2f} us a record)")
    check = SQLiteStore(str(path)).check()
    log(f"  check: integrity {check['integrity']}, {check['records']:,} records, counters {check['counter_mismatches']};"
        f" {os.path.getsize(path) / records:,.0f} bytes on disk a record")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--clinics", type=int, default=500)
    p.add_argument("--runs", type=int, default=3, help="runs of the command (then one phased run)")
    p.add_argument("--baseline", metavar="CHECKOUT", default=None,
                   help="also run the seed command of another checkout (e.g. /work/main), alternating with ours")
    p.add_argument("--tmpdir", default=None)
    args = p.parse_args()
    log_command()
    log(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the start")
    checkouts = {"ours": ROOT, **({"baseline": Path(args.baseline)} if args.baseline else {})}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in checkouts}
    for n in range(args.runs):
        for name, repo in checkouts.items():  # alternating, so both meet the same load
            with tempfile.TemporaryDirectory(prefix="records-seed-", dir=args.tmpdir) as tmp:
                rate, wall, cpu = command_run(Path(tmp) / "records.db", args.records, args.clinics, repo)
            results[name].append((rate, wall, cpu))
            log(f"run {n + 1}, {name}: {rate:,.0f} records/s, {wall:.1f} s wall, {cpu:.1f} s CPU (user + system)"
                f" [load average {os.getloadavg()[0]:.1f}]")
    for name, runs in results.items():
        if runs:
            rates, walls, cpus = zip(*runs)
            log(f"{name} ({checkouts[name]}): seed --records {args.records:,} --clinics {args.clinics}: median"
                f" {statistics.median(rates):,.0f} records/s, {statistics.median(walls):.1f} s wall,"
                f" {statistics.median(cpus):.1f} s CPU ({statistics.median(cpus) / args.records * 1e6:.1f} us CPU a record)")
    log("phases, in this process:")
    with tempfile.TemporaryDirectory(prefix="records-seed-", dir=args.tmpdir) as tmp:
        phased_run(Path(tmp) / "records.db", args.records, args.clinics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
