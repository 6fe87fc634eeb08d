"""The command line: `python -m records_service COMMAND ...`.

Each command is one small function `run_<name>(args, settings) -> int` with its arguments
declared in `build_parser`. Settings come from the environment and `.env`, as for the server.
"""

from __future__ import annotations

import argparse
import logging.config
import os
import sys

from .config import ConfigError, Settings, load_dotenv_file, load_settings
from .logs import logging_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m records_service")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    del commands  # each command registers itself here: commands.add_parser(...).set_defaults(run=run_<name>)
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
