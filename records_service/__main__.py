"""The command line: `python -m records_service COMMAND ...`.

Each command is one small function `run_<name>(args, settings) -> int` with its arguments
declared in `build_parser`. Settings come from the environment and `.env`, as for the server.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging.config
import os
import sys
import time

from . import __version__, keys
from .app import utc_now
from .config import (ConfigError, Settings, load_dotenv_file, load_settings, parse_database_url, redact_url,
                     unknown_variables)
from .imports.run import run_import
from .imports.source import SourceError, load_source
from .logs import logging_config
from .seed import ProgressBar, rows_made_in_another_process, seed_rows_in_key_order
from .store import Store, StoreBusy, StoreError, copy_to_postgresql, open_store
from .trace import entries_of, timeline
from .validate import check_id, utc_millis

MAX_KEY_NAME_CHARS = 100


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
    """Copy RECORDS_DB_PATH to DEST with SQLite's backup API, consistent while the service writes
    (on PostgreSQL: say, in one line, to use pg_dump)."""
    try:
        copied = _store(settings).backup(args.dest)
    except StoreBusy:
        print("records_service backup: the database stayed locked past the busy bound; nothing written",
              file=sys.stderr)
        return 1
    except (StoreError, OSError) as exc:
        print(f"records_service backup: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {copied['records']} records (schema version {copied['schema_version']}) to {args.dest}")
    return 0


def run_check(args: argparse.Namespace, settings: Settings) -> int:
    """Integrity, schema version and dashboard counters of a database (RECORDS_DB_PATH or PATH,
    or RECORDS_DATABASE_URL's)."""
    if args.path:
        settings = dataclasses.replace(settings, db_path=args.path, database_url=None)
    path = settings.database_name() if settings.database_url else settings.db_path
    try:
        facts = _store(settings).check()
    except StoreBusy:
        print(f"records_service check: {path} stayed locked past the busy bound", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"records_service check: {exc}", file=sys.stderr)
        return 1
    problems = [f"integrity: {line}" for line in facts["integrity"] if line != "ok"]
    if facts["schema_version"] != facts["expected_schema_version"]:
        problems.append(f"schema version {facts['schema_version']}, this code expects {facts['expected_schema_version']}"
                        " (starting the service migrates an older one forward)")
    problems += [f"{table}: {count} counter rows disagree with the records" for table, count
                 in facts.get("counter_mismatches", {}).items() if count]
    print(f"{path}: integrity {'ok' if facts['integrity'] == ['ok'] else 'FAILED'}, "
          f"schema version {facts['schema_version']}, {facts['records']} records")
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


def run_copy(args: argparse.Namespace, settings: Settings) -> int:
    """Copy the SQLite database (RECORDS_DB_PATH, or --from) into an empty PostgreSQL one."""
    if args.source:
        settings = dataclasses.replace(settings, db_path=args.source)
    target = redact_url(args.to)
    try:
        copied = copy_to_postgresql(settings, args.to)
    except StoreError as exc:
        print(f"records_service copy: {exc}; nothing copied", file=sys.stderr)
        return 1
    print(f"copied {copied['records']} records, {copied['record_versions']} superseded versions and "
          f"{copied['api_keys']} keys from {os.path.abspath(settings.db_path)} to {target}")
    print(f"serve it with RECORDS_DATABASE_URL={target}")
    return 0


def _postgres_url(value: str) -> str:
    try:
        return parse_database_url("--to", value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _where(settings: Settings) -> str:
    """The database, as an operator names it: the full path of the SQLite file, or the URL."""
    return settings.database_name() if settings.database_url else os.path.abspath(settings.db_path)


def _store(settings: Settings) -> Store:
    """The database the server uses; opened (and migrated) at its first use."""
    return open_store(settings)


def _now() -> str:
    return utc_millis(utc_now())


def _clinic(value: str) -> str:
    problem = check_id(value)
    if problem:
        raise argparse.ArgumentTypeError(f"clinic id {value!r} {problem}")
    return value


def _key_name(value: str) -> str:
    if not value.strip() or len(value) > MAX_KEY_NAME_CHARS or not value.isprintable():
        raise argparse.ArgumentTypeError(f"a key name is 1 to {MAX_KEY_NAME_CHARS} printable characters")
    return value.strip()


def _scope(clinics: list[str] | None) -> str:
    return "every clinic" if clinics is None else ", ".join(clinics)


def run_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    roles = sorted(set(args.role), key=keys.ROLES.index)
    clinics = None if args.all_clinics else sorted(set(args.clinic))
    try:
        key_id, token = keys.create_key(_store(settings), name=args.name, roles=roles, clinics=clinics, now=_now())
    except ValueError as exc:
        print(f"records_service: {exc}", file=sys.stderr)
        return 2
    print(f"created key {key_id} ({args.name}) in {_where(settings)}")
    print(f"  roles:   {', '.join(roles)}")
    print(f"  clinics: {_scope(clinics)}")
    print("The key follows, alone on the last line. It is shown only now and stored only as a hash:")
    print("keep it secret; send it as Authorization: Bearer <key>.")
    print(token)
    return 0


def run_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    listed = _store(settings).list_keys()
    if not listed:
        print(f"no keys in {_where(settings)}; create one with: "
              "python -m records_service keys create --role admin --all-clinics --name NAME")
        return 0
    rows = [("KEY_ID", "STATUS", "ROLES", "CLINICS", "CREATED", "NAME")]
    rows += [(k["key_id"], f"revoked {k['revoked_at']}" if k["revoked_at"] else "active", ",".join(k["roles"]),
              "*" if k["clinics"] is None else ",".join(k["clinics"]), k["created_at"], k["name"]) for k in listed]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def run_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    result = _store(settings).revoke_key(args.key_id, _now())
    if result is None:
        print(f"records_service: no key {args.key_id!r} in {_where(settings)} "
              "(see: python -m records_service keys list)", file=sys.stderr)
        return 1
    key, changed = result
    if changed:
        print(f"revoked key {key['key_id']} ({key['name']}): every request with it is refused from now on")
    else:
        print(f"key {key['key_id']} ({key['name']}) was already revoked at {key['revoked_at']}")
    return 0


def _at_least_1(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {raw})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m records_service")
    parser.add_argument("--version", action="version", version=f"records_service {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    key_commands = commands.add_parser("keys", help="create, list and revoke API keys").add_subparsers(
        dest="keys_command", required=True, metavar="create|list|revoke")
    create = key_commands.add_parser(
        "create", help="create a key and print it once",
        description="Create an API key. --role and --clinic may be repeated; the key is printed once, "
                    "alone on the last line of standard output.")
    create.add_argument("--role", action="append", required=True, choices=keys.ROLES,
                        help="ingest (write records), read (read records), admin (everything); repeatable")
    scope = create.add_mutually_exclusive_group(required=True)
    scope.add_argument("--clinic", action="append", type=_clinic, metavar="CLINIC_ID",
                       help="a clinic the key may access; repeatable")
    scope.add_argument("--all-clinics", action="store_true", help="the key may access every clinic")
    create.add_argument("--name", required=True, type=_key_name, help='who or what uses the key, e.g. "lab A"')
    create.set_defaults(run=run_keys_create)
    key_commands.add_parser("list", help="list every key (never a secret)").set_defaults(run=run_keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key: refused from the next request on")
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key's public id, as `keys list` shows it")
    revoke.set_defaults(run=run_keys_revoke)
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
    copy = commands.add_parser("copy", help="copy the SQLite database into an empty PostgreSQL one",
                               description="Copy every record, its history, the API keys and the cursor key of the "
                                           "SQLite database (RECORDS_DB_PATH) into an empty PostgreSQL database, as of "
                                           "one commit; counters are recounted there. The SQLite file is left as it was "
                                           "(migrated to the current schema first).")
    copy.add_argument("--to", required=True, type=_postgres_url, metavar="URL",
                      help="the PostgreSQL database, postgresql://user@host/database")
    copy.add_argument("--from", dest="source", metavar="PATH", help="the SQLite file (default: RECORDS_DB_PATH)")
    copy.set_defaults(run=run_copy)
    seed = commands.add_parser("seed", help="fill the database with synthetic records, fast")
    seed.add_argument("--records", type=_at_least_1, required=True, help="how many records to add")
    seed.add_argument("--clinics", type=_at_least_1, default=500, help="spread over this many clinics (default 500)")
    seed.add_argument("--random-seed", type=int, default=None, help="make the records' content reproducible")
    seed.set_defaults(run=run_seed)
    pull = commands.add_parser("import", help="pull records from an upstream API described by a source file")
    pull.add_argument("source_file", metavar="SOURCE_FILE", help="the source's TOML file (see README)")
    pull.add_argument("--dry-run", action="store_true", help="fetch and validate; store nothing, save no progress")
    pull.set_defaults(run=run_import_source)
    return parser


def run_seed(args: argparse.Namespace, settings: Settings) -> int:
    """Add synthetic records to RECORDS_DB_PATH (migrating it first), with a progress bar on a terminal."""
    store = _store(settings)
    bar = ProgressBar(args.records)
    started = time.perf_counter()
    rows = rows_made_in_another_process(seed_rows_in_key_order, args.records, args.clinics, utc_now(),
                                        rng_seed=args.random_seed)
    try:
        for done in store.bulk_insert(rows):
            bar.update(done)
    except StoreError as exc:
        print(f"records_service: seed failed: {exc}", file=sys.stderr)
        return 1
    finally:
        rows.close()
        bar.close()
        store.close()
    elapsed = time.perf_counter() - started
    print(f"seeded {args.records:,} records over {args.clinics:,} clinics into {settings.database_name()} "
          f"in {elapsed:.1f}s ({args.records / elapsed:,.0f} records/s)")
    return 0


def run_import_source(args: argparse.Namespace, settings: Settings) -> int:
    """Pull one source into RECORDS_DB_PATH: 0 all stored or unchanged, 1 some items failed,
    2 the source file is invalid (nothing fetched), 3 the run stopped before its last page (the
    upstream could not be read, or the database refused a page): what was committed stays, run
    again to resume. The last line of standard output is the summary."""
    try:
        source = load_source(args.source_file, os.environ)
    except SourceError as exc:
        print(f"records_service import: {args.source_file}: {exc}", file=sys.stderr)
        return 2
    store = _store(settings)
    try:
        store.open()  # before the run, so opening (and migrating) is not logged as part of it
        outcome = run_import(source, store, dry_run=args.dry_run, now=utc_now, progress_stream=sys.stderr)
    finally:
        store.close()
    if outcome.problem:
        print(f"records_service import: {source.name}: stopped before the last page ({outcome.problem}); "
              "what was committed stays, run again to resume", file=sys.stderr)
    print(json.dumps(outcome.summary, ensure_ascii=False))
    return outcome.status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_dotenv_file()
    try:
        settings: Settings = load_settings(os.environ)
    except ConfigError as exc:
        print(f"records_service: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.config.dictConfig(logging_config(settings.log_level))
    for warning in unknown_variables(os.environ):
        logging.getLogger("records_service.config").warning(warning)
    try:
        return args.run(args, settings)
    except StoreError as exc:
        print(f"records_service: the database {settings.database_name()} cannot be used now: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
