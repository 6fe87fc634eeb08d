"""Settings read once from the environment (and `.env`), validated, then passed in.

Each variable has one small parser; a bad value raises ConfigError naming the variable,
which the entry points turn into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from typing import Callable, Mapping

from dotenv import load_dotenv


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    db_path: str = "records.db"
    log_level: str = "INFO"
    max_body_bytes: int = 1_048_576
    max_batch_bytes: int = 16_777_216
    auth: str = "required"
    synchronous: str = "NORMAL"
    busy_timeout_ms: int = 5_000
    body_timeout_ms: int = 10_000
    database_url: str | None = None  # PostgreSQL instead of the SQLite file at db_path

    def database_name(self) -> str:
        """Which database this is, fit for an operator's message: never a password."""
        return redact_url(self.database_url) if self.database_url else self.db_path


def _text(name: str, raw: str) -> str:
    if not raw.strip():
        raise ConfigError(f"{name} must not be empty")
    return raw


def _log_level(name: str, raw: str) -> str:
    level = raw.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"{name} must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL (got {raw!r})")
    return level


def _whole_number_of(unit: str) -> Callable[[str, str], int]:
    """A parser for a count of `unit`s (bytes, milliseconds), at least 1."""

    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a whole number of {unit}, without a unit (got {raw!r})") from None
        if value < 1:
            raise ConfigError(f"{name} must be at least 1 ({unit}; got {raw!r})")
        return value

    return parse


def parse_database_url(name: str, raw: str) -> str:
    value = raw.strip()
    try:
        parts = urlsplit(value)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("postgresql", "postgres") or not (parts.netloc or parts.query):
        raise ConfigError(f"{name} must be a postgresql://user@host/database URL (got {redact_url(value)!r})")
    return value


def redact_url(url: str) -> str:
    """`url` with its password (if any) replaced by ***, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "<unreadable URL>"
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip()
        matches = [a for a in allowed if a.lower() == value.lower()]
        if not matches:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)} (got {raw!r})")
        return matches[0]

    return parse


_PARSERS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "RECORDS_DB_PATH": ("db_path", _text),
    "RECORDS_LOG_LEVEL": ("log_level", _log_level),
    "RECORDS_MAX_BODY_BYTES": ("max_body_bytes", _whole_number_of("bytes")),
    "RECORDS_MAX_BATCH_BYTES": ("max_batch_bytes", _whole_number_of("bytes")),
    "RECORDS_AUTH": ("auth", _choice("required", "disabled")),
    "RECORDS_SYNCHRONOUS": ("synchronous", _choice("NORMAL", "FULL")),
    "RECORDS_BUSY_TIMEOUT_MS": ("busy_timeout_ms", _whole_number_of("milliseconds")),
    "RECORDS_BODY_TIMEOUT_MS": ("body_timeout_ms", _whole_number_of("milliseconds")),
    "RECORDS_DATABASE_URL": ("database_url", parse_database_url),
}


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Build Settings from an environment mapping; unset variables keep their defaults."""
    values = {
        field: parse(name, environ[name])
        for name, (field, parse) in _PARSERS.items()
        if name in environ
    }
    return Settings(**values)


_PREFIX = "RECORDS_"


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each RECORDS_* variable that is not a setting, naming the closest one: a
    misspelled setting is otherwise ignored without a word, and its default silently used."""
    known = list(_PARSERS)
    warnings = []
    for name in sorted(n for n in environ if n.upper().startswith(_PREFIX) and n not in _PARSERS):
        # Compared without the prefix every name shares, which would make any two look alike.
        closest = difflib.get_close_matches(name.upper().removeprefix(_PREFIX),
                                            [k.removeprefix(_PREFIX) for k in known], n=1, cutoff=0.6)
        hint = f"did you mean {_PREFIX}{closest[0]}?" if closest else f"the settings are {', '.join(known)}"
        warnings.append(f"{name} is not a records_service setting and is ignored: {hint}")
    return warnings


def load_dotenv_file(directory: Path | None = None) -> None:
    """Load `.env` from the working directory (or `directory`); the real environment wins.

    The path is explicit because python-dotenv's default search starts from the calling
    file, not from where the operator ran the command.
    """
    load_dotenv((directory or Path.cwd()) / ".env", override=False)
