"""The command line: `python -m records_service COMMAND ...`.

Each command is one small function `run_<name>(args, settings) -> int` with its arguments
declared in `build_parser`. Settings come from the environment and `.env`, as for the server.
"""

from __future__ import annotations

import argparse
import logging.config
import os
import sys
import time

from .app import utc_now
from .config import ConfigError, Settings, load_dotenv_file, load_settings
from .errors import StoreBusy, StoreUnavailable
from .logs import logging_config
from .seed import ProgressBar, seed_rows
from .store import Store


def _at_least_1(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {raw})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m records_service")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # each command registers itself here: commands.add_parser(...).set_defaults(run=run_<name>)

    seed = commands.add_parser("seed", help="fill the database with synthetic records, fast")
    seed.add_argument("--records", type=_at_least_1, required=True, help="how many records to add")
    seed.add_argument("--clinics", type=_at_least_1, default=500, help="spread over this many clinics (default 500)")
    seed.add_argument("--random-seed", type=int, default=None, help="make the records' content reproducible")
    seed.set_defaults(run=run_seed)
    return parser


def run_seed(args: argparse.Namespace, settings: Settings) -> int:
    """Add synthetic records to RECORDS_DB_PATH (migrating it first), with a progress bar on a terminal."""
    store = Store(settings.db_path, synchronous=settings.synchronous, busy_timeout_ms=settings.busy_timeout_ms)
    bar = ProgressBar(args.records)
    started = time.perf_counter()
    try:
        for done in store.bulk_insert(seed_rows(args.records, args.clinics, utc_now(), rng_seed=args.random_seed)):
            bar.update(done)
    except (StoreUnavailable, StoreBusy) as exc:
        print(f"records_service: seed failed: {exc or 'the database stayed busy'}", file=sys.stderr)
        return 1
    finally:
        bar.close()
        store.close()
    elapsed = time.perf_counter() - started
    print(f"seeded {args.records:,} records over {args.clinics:,} clinics into {settings.db_path} "
          f"in {elapsed:.1f}s ({args.records / elapsed:,.0f} records/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_dotenv_file()
    try:
        settings: Settings = load_settings(os.environ)
    except ConfigError as exc:
        print(f"records_service: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.config.dictConfig(logging_config(settings.log_level))
    return args.run(args, settings)


if __name__ == "__main__":
    sys.exit(main())
