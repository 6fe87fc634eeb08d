"""Thin Falcon resources: read the input, call validation and the store, set the answer."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Callable

import falcon

from .access import clinic_forbidden
from .errors import DuplicateRecord, Problem, invalid_parameter, invalid_record
from .store import Store
from .validate import MalformedJSON, check_id, client_fields, parse_json, validate_record

log = logging.getLogger("records_service.http")

JSON = "application/json"


def read_body(req: falcon.Request, limit: int, accepted: tuple[str, ...] = (JSON,)) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes.

    A declared Content-Length over the limit is refused before anything is read; a chunked
    body is read at most one byte past the limit.
    """
    media_type = (req.content_type or "").split(";", 1)[0].strip().lower()
    if media_type not in accepted:
        raise Problem(415, "unsupported-media-type",
                      f"Content-Type must be {' or '.join(accepted)} (got {media_type or 'none'})")
    if req.content_length is not None:
        if req.content_length > limit:
            raise _too_large(limit)
        body = req.bounded_stream.read()
    elif req.env.get("wsgi.input_terminated"):
        body = req.stream.read(limit + 1)
    else:
        body = b""
    if len(body) > limit:
        raise _too_large(limit)
    return body


def _too_large(limit: int) -> Problem:
    return Problem(413, "too-large", f"the body is larger than the limit of {limit} bytes")


def read_json(req: falcon.Request, limit: int):
    try:
        return parse_json(read_body(req, limit))
    except MalformedJSON as exc:
        raise Problem(400, "malformed-json", str(exc), title="Malformed JSON") from None


def require_valid(checked: tuple[dict | None, list[dict]]) -> dict:
    """The record from a validator's (record, errors), or a logged 400 naming every failing field."""
    record, errors = checked
    if errors:
        log.info("record rejected", extra={"error_count": len(errors)})
        raise invalid_record(errors)
    return record


def utc_millis(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


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
            body = self._store.insert(record, request_id=req.context.request_id, now=utc_millis(now))
        except DuplicateRecord as dup:
            raise Problem(409, "duplicate", f"a record with test_id {record['test_id']} already exists; nothing was changed",
                          identical=client_fields(dup.stored) == record) from None
        resp.status = falcon.HTTP_201
        resp.location = f"/tests/{record['test_id']}"
        resp.content_type = JSON
        resp.text = body

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        params = query_params(req, allowed={"clinic_id"}, required={"clinic_id"})
        problem = check_id(params["clinic_id"])
        if problem:
            raise invalid_parameter("clinic_id", problem)
        if not req.context.principal.sees(params["clinic_id"]):
            raise clinic_forbidden(params["clinic_id"])
        body, count = self._store.list_clinic_json(params["clinic_id"])
        req.context.log_fields = {"count": count}
        resp.content_type = JSON
        resp.text = body


class Health:
    """GET /health: the process is serving; touches no database."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}
