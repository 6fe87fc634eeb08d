"""The CPU a batched record costs above SQL: parse, validate and prepare, no HTTP, no database.

    .venv/bin/python bench/bench_batch_path.py [--runs 30] [--records 1000]

Builds one NDJSON body of `--records` realistic records for one clinic (records_gen, as
bench_scale.py's batch scenario sends), then runs what `POST /tests/_batch` does with it before
the store's SQL, `--runs` times: `parse_batch`, `collection._triage` (validation, duplicates,
access) and `store.prepare` of every accepted record (the row and its stored JSON). Prints the
CPU time per record of the fastest run, split in parse+triage and prepare: the figure noise on a
shared machine moves least. For a count that noise does not move at all, run it under valgrind
with two run counts and divide the difference of the instructions by the extra records:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/bench_batch_path.py --runs 1
    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/bench_batch_path.py --runs 6

Run it from another checkout (e.g. `git worktree add /tmp/old <commit>`) to compare versions.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import datetime, timezone

import records_gen
from common import ROOT  # noqa: F401  (puts the checkout this script is in on sys.path)

from records_service.access import UNRESTRICTED
from records_service.collection import _triage
from records_service.store import prepare
from records_service.validate import parse_batch


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--records", type=int, default=1000)
    args = p.parse_args(argv)
    rng = random.Random(1)
    body = "".join(json.dumps(records_gen.make_record(f"t-{i}", "C0001", rng)) + "\n"
                   for i in range(args.records)).encode()
    now = datetime(2025, 6, 1, tzinfo=timezone.utc)  # after every record records_gen makes
    best_triage = best_prepare = float("inf")
    for _ in range(args.runs):
        started = time.process_time()
        accepted, failed = _triage(parse_batch(body, ndjson=True, max_records=10_000), now, UNRESTRICTED)
        triaged = time.process_time()
        rows = [prepare(record, "bench-request", "2025-06-01T00:00:00.000Z") for _, record in accepted]
        prepared = time.process_time()
        if failed or len(rows) != args.records:
            raise SystemExit(f"expected {args.records} valid records, {len(failed)} failed")
        best_triage = min(best_triage, triaged - started)
        best_prepare = min(best_prepare, prepared - triaged)
    per = 1e6 / args.records
    print(f"{ROOT}: CPU per record, fastest of {args.runs} runs of {args.records}: parse+triage "
          f"{best_triage * per:.1f} us, prepare {best_prepare * per:.1f} us, "
          f"total {(best_triage + best_prepare) * per:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
