"""Thin Falcon resources: read the input, call validation and the store, set the answer."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Callable, Iterable
from urllib.parse import quote, urlencode

import falcon

from . import cursor
from .access import clinic_forbidden
from .errors import (Problem, duplicate_record, invalid_parameter, invalid_parameters,
                     invalid_record, malformed_json)
from .store import DuplicateRecord, Store
from .validate import (FILTERS, MalformedJSON, client_fields, parse_json, utc_millis, validate_list_query,
                       validate_record)

log = logging.getLogger("records_service.http")

JSON = "application/json"


def read_body(req: falcon.Request, limit: int, accepted: tuple[str, ...] = (JSON,)) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes.

    A declared Content-Length over the limit is refused before anything is read; a chunked
    body is read at most one byte past the limit. A body not in by the request's deadline
    (body_deadline.BodyTimeout) is a 408.
    """
    kind = media_type(req)
    if kind not in accepted:
        raise Problem(415, "unsupported-media-type", f"Content-Type must be {' or '.join(accepted)} (got {kind or 'none'})")
    if req.content_length is not None and req.content_length > limit:
        raise _too_large(limit)
    with req.context.body_deadline:
        body = _read_stream(req, limit)
    if len(body) > limit:
        raise _too_large(limit)
    return body


def _read_stream(req: falcon.Request, limit: int) -> bytes:
    """Read the body the server hands over (at most `limit` + 1 bytes of a chunked one); 400 when
    the server cannot decode it: a broken chunk size or terminator, or a body cut short."""
    try:
        if req.content_length is not None:
            return req.bounded_stream.read()
        if req.env.get("wsgi.input_terminated"):
            return req.stream.read(limit + 1)
        return b""
    except Exception as exc:
        # Deliberately broad: what a WSGI server raises for a body it cannot decode is its own
        # (gunicorn: InvalidChunkSize, ChunkMissingTerminator, NoMoreData, ...), and nothing but
        # the read is in this block. The server closes the connection after the answer.
        log.info("request body unreadable", extra={"error": type(exc).__name__})
        raise Problem(400, "unreadable-body", "the request body could not be read: its chunked encoding is broken"
                      " or it ended before its end (a chunk size that is not hex, a missing CRLF or final 0 chunk)",
                      title="Unreadable body") from None


def media_type(req: falcon.Request) -> str:
    """The request's Content-Type without parameters, lower case ("" when absent)."""
    return (req.content_type or "").split(";", 1)[0].strip().lower()


def _too_large(limit: int) -> Problem:
    return Problem(413, "too-large", f"the body is larger than the limit of {limit} bytes")


def read_json(req: falcon.Request, limit: int):
    try:
        return parse_json(read_body(req, limit))
    except MalformedJSON as exc:
        raise malformed_json(str(exc)) from None


def require_valid(checked: tuple[dict | None, list[dict]]) -> dict:
    """The record from a validator's (record, errors), or a logged 400 naming every failing field."""
    record, errors = checked
    if errors:
        log.info("record rejected", extra={"error_count": len(errors)})
        raise invalid_record(errors)
    return record


def query_params(req: falcon.Request, allowed: set[str], required: set[str]) -> dict[str, str]:
    """The query parameters as single strings; unknown, repeated or missing ones are a 400."""
    params: dict[str, str] = {}
    for name, value in req.params.items():
        if name not in allowed:
            raise invalid_parameter(name, "is not supported here")
        if isinstance(value, list):
            raise invalid_parameter(name, "must be given only once")
        params[name] = value
    for name in sorted(required - params.keys()):
        raise invalid_parameter(name, "is required")
    return params


def clinic_query(req: falcon.Request, extra: Iterable[str] = (),
                 filter_names: Iterable[str] = FILTERS) -> tuple[dict, dict]:
    """A query about one clinic: (checked query {"filters", "limit"}, the raw parameters).

    Takes clinic_id, the filters named, and `extra` parameters the caller checks itself.
    400 names every bad parameter; 403 when the caller may not see the clinic.
    """
    params = query_params(req, allowed={"clinic_id", *filter_names, *extra}, required={"clinic_id"})
    query, errors = validate_list_query(params)
    if errors:
        raise invalid_parameters(errors)
    clinic_id = query["filters"]["clinic_id"]
    if not req.context.principal.sees(clinic_id):
        raise clinic_forbidden(clinic_id)
    return query, params


def next_link(path: str, filters: dict[str, str], limit: int, token: str) -> str:
    """RFC 8288 `Link` to the next page: the same filters (in their clean form), limit, and the cursor."""
    query = urlencode({**filters, "limit": limit, "cursor": token}, quote_via=quote, safe="")
    return f'<{path}?{query}>; rel="next"'


class TestsCollection:
    """POST /tests (ingest one record) and GET /tests?clinic_id= (the clinic's records)."""

    def __init__(self, store: Store, clock: Callable[[], datetime], max_body_bytes: int) -> None:
        self._store = store
        self._clock = clock
        self._max_body_bytes = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        doc = read_json(req, self._max_body_bytes)
        now = self._clock()
        record = require_valid(validate_record(doc, now))
        if not req.context.principal.sees(record["clinic_id"]):
            raise clinic_forbidden(record["clinic_id"])
        try:
            body = self._store.insert(record, request_id=req.context.request_id,
                                      key_id=req.context.principal.key_id, now=utc_millis(now))
        except DuplicateRecord as dup:
            raise duplicate_record(record["test_id"], client_fields(dup.stored) == record) from None
        resp.status = falcon.HTTP_201
        resp.location = f"/tests/{record['test_id']}"
        resp.content_type = JSON
        resp.text = body

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        query, params = clinic_query(req, extra=("limit", "cursor"))
        filters, limit = query["filters"], query["limit"]
        after_seq = 0
        if "cursor" in params:
            after_seq = cursor.decode(self._store.cursor_secret(), filters, params["cursor"])
            if after_seq is None:
                raise invalid_parameter("cursor", "is not a cursor this service issued for these filters")
        body, count, next_after = self._store.list_page(filters, after_seq, limit)
        if next_after is not None:
            resp.set_header("Link", next_link(req.root_path + req.path, filters, limit,
                                              cursor.encode(self._store.cursor_secret(), filters, next_after)))
        req.context.log_fields = {"count": count}
        resp.content_type = JSON
        resp.text = body


class Health:
    """GET /health: the process is serving; touches no database."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}
