"""A source file: one upstream API described in TOML, checked whole before anything is fetched.

`load_source(path, environ)` returns a frozen Source or raises SourceError whose message is one
line naming the key at fault. `${VAR}` in header values is read from `environ` here, once; the
values never appear in a message (a header is named by its key, never shown).
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..validate import CLIENT_FIELDS, REQUIRED_FIELDS
from .paths import Path, PathError, parse_path

KINDS = ("rest", "graphql")
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", re.ASCII)
HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)  # RFC 9110 token
HEADER_VALUE_RE = re.compile(r"[\t\x20-\x7e]*", re.ASCII)
DEFAULT_MAX_PAGE_BYTES = 16 * 1024 * 1024

_COMMON_KEYS = {"name", "kind", "url", "headers", "records", "watermark", "since", "timeout", "retries", "rate",
                "max_page_bytes", "fields", "values"}
_KEYS = {"rest": _COMMON_KEYS | {"next"}, "graphql": _COMMON_KEYS | {"query", "cursor", "has_next"}}


class SourceError(ValueError):
    """A source file that cannot be used; str() is one line naming the key."""


@dataclass(frozen=True)
class Fixed:
    """A record field given the same value for every item (`{ value = ... }`)."""

    value: Any


@dataclass(frozen=True)
class Source:
    name: str
    kind: str
    url: str
    headers: Mapping[str, str] = field(repr=False)  # expanded: may hold secrets, never shown
    records: Path
    fields: Mapping[str, Path | Fixed]
    values: Mapping[str, Mapping[str, Any]]
    next: Path | None = None          # rest: a path to the next page's URL; None means the Link header
    query: str | None = None          # graphql
    cursor: Path | None = None        # graphql
    has_next: Path | None = None      # graphql
    watermark: Path | None = None
    since: str = ""
    timeout: float = 10.0
    retries: int = 5
    rate: float = 10.0
    max_page_bytes: int = DEFAULT_MAX_PAGE_BYTES


def load_source(path: str, environ: Mapping[str, str]) -> Source:
    """Read and check the source file at `path`; SourceError names what is wrong."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise SourceError(f"cannot read the source file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SourceError(f"{path} is not valid TOML: {exc}") from None
    return parse_source(document, environ)


def _require(document: dict, key: str) -> Any:
    if key not in document:
        raise SourceError(f"{key}: is required")
    return document[key]


def _string(key: str, value: Any, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise SourceError(f"{key}: must be a string")
    if not empty and not value:
        raise SourceError(f"{key}: must not be empty")
    return value


def _number(key: str, value: Any, *, whole: bool = False, at_least: float = 0) -> Any:
    # TOML gives bool for true/false, and bool is an int in Python: refuse it first.
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        raise SourceError(f"{key}: must be a {'whole ' if whole else ''}number")
    if not math.isfinite(value) or value < at_least or (not whole and value <= 0):
        raise SourceError(f"{key}: must be {'at least ' + str(at_least) if whole else 'greater than 0'}")
    return value


def _path(key: str, value: Any, *, many: bool = False) -> Path:
    try:
        return parse_path(_string(key, value), many=many)
    except PathError as exc:
        raise SourceError(f"{key}: {exc}") from None


def check_url(key: str, url: str) -> str:
    """An absolute http or https URL with a host, or SourceError."""
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError for a port that is not a number or out of range
    except ValueError:
        raise SourceError(f"{key}: is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SourceError(f"{key}: must be an absolute http:// or https:// URL")
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise SourceError(f"{key}: must be ASCII without spaces (percent-encode anything else)")
    return url


def _headers(value: Any, environ: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(value, dict):
        raise SourceError("headers: must be a table of header names and values")
    headers = {}
    for name, raw in value.items():
        key = f"headers.{name}"
        if not HEADER_NAME_RE.fullmatch(name):
            raise SourceError(f"{key}: is not a valid header name")
        raw = _string(key, raw)

        def expand(match: re.Match) -> str:
            if match.group(1) not in environ:
                raise SourceError(f"{key}: the environment variable {match.group(1)} is not set")
            return environ[match.group(1)]

        expanded = VAR_RE.sub(expand, raw)
        # HTTP sends header values as visible ASCII (and tabs); anything else would fail each request.
        if not HEADER_VALUE_RE.fullmatch(expanded):
            raise SourceError(f"{key}: the value (once expanded) must be printable ASCII on one line")
        headers[name] = expanded
    return headers


def _fields(value: Any) -> dict[str, Path | Fixed]:
    if not isinstance(value, dict):
        raise SourceError("fields: must be a table of record fields")
    fields: dict[str, Path | Fixed] = {}
    for name, spec in value.items():
        key = f"fields.{name}"
        if name not in CLIENT_FIELDS:
            raise SourceError(f"{key}: is not a record field (one of {', '.join(CLIENT_FIELDS)})")
        if isinstance(spec, dict):
            if set(spec) != {"value"}:
                raise SourceError(f"{key}: a fixed value is written {{ value = ... }}")
            fields[name] = Fixed(spec["value"])
        else:
            fields[name] = _path(key, spec)
    for name in REQUIRED_FIELDS:
        if name not in fields:
            raise SourceError(f"fields.{name}: is required (a path or {{ value = ... }})")
    return fields


def _values(value: Any, fields: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise SourceError("values: must be a table of value maps, one per record field")
    maps = {}
    for name, mapping in value.items():
        if name not in fields:
            raise SourceError(f"values.{name}: maps a field that [fields] does not list")
        if not isinstance(mapping, dict):
            raise SourceError(f"values.{name}: must be a table of upstream value = record value")
        maps[name] = dict(mapping)
    return maps


def parse_source(document: dict, environ: Mapping[str, str]) -> Source:
    """A Source from a parsed TOML document; SourceError names the first key at fault."""
    kind = _string("kind", _require(document, "kind"))
    if kind not in KINDS:
        raise SourceError(f"kind: must be one of {', '.join(KINDS)} (got {kind!r})")
    for key in document:
        if key not in _KEYS[kind]:
            raise SourceError(f"{key}: is not a key of a {kind} source")
    name = _string("name", _require(document, "name"))
    if not NAME_RE.fullmatch(name):
        raise SourceError("name: must be 1 to 64 characters of A-Z a-z 0-9 . _ -")
    url = check_url("url", _string("url", _require(document, "url")))
    fields = _fields(_require(document, "fields"))
    options: dict[str, Any] = {
        "name": name, "kind": kind, "url": url,
        "headers": _headers(document.get("headers", {}), environ),
        "records": _path("records", _require(document, "records") if kind == "graphql" else document.get("records", ""),
                         many=True),
        "fields": fields,
        "values": _values(document.get("values", {}), fields),
        "since": _string("since", document.get("since", "")),
    }
    if kind == "rest":
        next_ = _string("next", document.get("next", "link"), empty=False)
        options["next"] = None if next_ == "link" else _path("next", next_)
    else:
        options["query"] = _string("query", _require(document, "query"), empty=False)
        options["cursor"] = _path("cursor", _require(document, "cursor"))
        options["has_next"] = _path("has_next", _require(document, "has_next"))
    if "watermark" in document:
        options["watermark"] = _path("watermark", document["watermark"])
    for key, whole, at_least in (("timeout", False, 0), ("rate", False, 0), ("retries", True, 1),
                                 ("max_page_bytes", True, 1024)):
        if key in document:
            options[key] = _number(key, document[key], whole=whole, at_least=at_least)
    return Source(**options)
