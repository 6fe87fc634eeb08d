"""The command line: `python -m records_service COMMAND ...`.

Each command is one small function `run_<name>(args, settings) -> int` with its arguments
declared in `build_parser`. Settings come from the environment and `.env`, as for the server.
"""

from __future__ import annotations

import argparse
import logging.config
import os
import sys

from . import store
from .config import ConfigError, Settings, load_dotenv_file, load_settings
from .errors import StoreBusy, StoreUnavailable
from .logs import logging_config
from .trace import entries_of, timeline


def run_trace(args: argparse.Namespace, settings: Settings) -> int:
    """Print one request's log lines as a timeline: 0 when found, 1 when none, 2 when a file
    could not be read (the others are still searched, as grep does)."""
    entries, unreadable = [], False
    for path in args.logfiles or ["-"]:
        try:
            if path == "-":
                sys.stdin.reconfigure(errors="replace")
                entries += entries_of(sys.stdin, args.request_id)
            else:
                with open(path, encoding="utf-8", errors="replace") as lines:
                    entries += entries_of(lines, args.request_id)
        except OSError as exc:
            print(f"trace: cannot read {path}: {exc.strerror}", file=sys.stderr)
            unreadable = True
    try:
        for line in timeline(entries, args.request_id):
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader stopped early (`| head`): not a failure. Point stdout at /dev/null so
        # Python's own flush at exit does not raise again (the recipe of the signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if not entries:
        print(f"trace: no log lines for request {args.request_id}", file=sys.stderr)
    return 2 if unreadable else 0 if entries else 1


def run_backup(args: argparse.Namespace, settings: Settings) -> int:
    """Copy RECORDS_DB_PATH to DEST with SQLite's backup API, consistent while the service writes."""
    try:
        copied = store.backup_database(settings.db_path, args.dest, busy_timeout_ms=settings.busy_timeout_ms)
    except StoreBusy:
        print("records_service backup: the database stayed locked past the busy bound; nothing written",
              file=sys.stderr)
        return 1
    except (StoreUnavailable, OSError) as exc:
        print(f"records_service backup: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {copied['records']} records (schema version {copied['schema_version']}) to {args.dest}")
    return 0


def run_check(args: argparse.Namespace, settings: Settings) -> int:
    """Integrity, schema version and dashboard counters of a database (RECORDS_DB_PATH or PATH)."""
    path = args.path or settings.db_path
    try:
        facts = store.check_database(path, busy_timeout_ms=settings.busy_timeout_ms)
    except StoreBusy:
        print(f"records_service check: {path} stayed locked past the busy bound", file=sys.stderr)
        return 1
    except StoreUnavailable as exc:
        print(f"records_service check: {exc}", file=sys.stderr)
        return 1
    problems = [f"integrity: {line}" for line in facts["integrity"] if line != "ok"]
    if facts["schema_version"] != store.SCHEMA_VERSION:
        problems.append(f"schema version {facts['schema_version']}, this code expects {store.SCHEMA_VERSION}"
                        " (starting the service migrates an older one forward)")
    problems += [f"{table}: {count} counter rows disagree with the records" for table, count
                 in facts.get("counter_mismatches", {}).items() if count]
    print(f"{path}: integrity {'ok' if facts['integrity'] == ['ok'] else 'FAILED'}, "
          f"schema version {facts['schema_version']}, {facts['records']} records")
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m records_service")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    trace = commands.add_parser("trace", help="print one request's log lines as a timeline")
    trace.add_argument("request_id", metavar="REQUEST_ID")
    trace.add_argument("logfiles", metavar="LOGFILE", nargs="*", help="JSON log files (default: standard input, or -)")
    trace.set_defaults(run=run_trace)
    backup = commands.add_parser("backup", help="copy the database, consistently, while the service runs")
    backup.add_argument("dest", metavar="DEST", help="the new file to write (must not exist)")
    backup.set_defaults(run=run_backup)
    check = commands.add_parser("check", help="verify integrity and schema version; non-zero exit on failure")
    check.add_argument("path", metavar="PATH", nargs="?", help="database to check (default: RECORDS_DB_PATH)")
    check.set_defaults(run=run_check)
    return parser


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
