"""Domain errors, and their one translation into RFC 9457 problem+json answers.

The store raises domain errors; resources raise `Problem`s; everything a client sees as an
error passes through `serialize_problem`, so every error body has the same shape and carries
the request ID. Unexpected exceptions are logged with their traceback and answered with a
bare 500 that reveals nothing else.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

import falcon

from .logs import request_id_var

log = logging.getLogger("records_service.errors")

PROBLEM_JSON = "application/problem+json"
_TYPE_PREFIX = "urn:records-service:problem:"


class StoreBusy(Exception):
    """The database stayed locked by other writers past the busy bound."""

    def __str__(self) -> str:
        return super().__str__() or "the database stayed locked by other writers past the busy bound"


class StoreUnavailable(Exception):
    """The database cannot be opened or used at all (missing directory, unreadable file)."""


class DuplicateRecord(Exception):
    """A record with this test_id exists; `stored` is the stored record."""

    def __init__(self, stored: dict) -> None:
        super().__init__(stored["test_id"])
        self.stored = stored


class VersionMismatch(Exception):
    """If-Match did not name the record's current version (`current`); nothing was written."""

    def __init__(self, current: int) -> None:
        super().__init__(current)
        self.current = current


class AlreadyVoided(Exception):
    """The record is already entered-in-error; voiding it again would change nothing."""


class Problem(falcon.HTTPError):
    """An HTTP error with an RFC 9457 `type` and extension members (errors, identical, ...)."""

    def __init__(self, status: int, kind: str, detail: str, *, title: str | None = None,
                 headers: dict | None = None, **members) -> None:
        super().__init__(status, title=title or HTTPStatus(status).phrase, description=detail, headers=headers)
        self.type_uri = _TYPE_PREFIX + kind
        self.members = members


def invalid_record(errors: list[dict], detail: str | None = None) -> Problem:
    count = len(errors)
    return Problem(400, "invalid-record", detail or f"the record has {count} invalid field{'s' * (count != 1)}",
                   title="Invalid record", errors=errors)


def invalid_parameter(name: str, message: str) -> Problem:
    return invalid_parameters([{"field": name, "message": message}])


def invalid_parameters(errors: list[dict]) -> Problem:
    """400 naming every failing query parameter; the detail spells out the first."""
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return Problem(400, "invalid-parameter", f"query parameter {first['field']} {first['message']}{more}",
                   title="Invalid query parameter", errors=errors)


def malformed_json(message: str) -> Problem:
    return Problem(400, "malformed-json", message, title="Malformed JSON")


def duplicate_record(test_id: str, identical: bool, detail: str | None = None) -> Problem:
    return Problem(409, "duplicate", detail or f"a record with test_id {test_id} already exists; nothing was changed",
                   identical=identical)


def problem_fields(problem: Problem) -> dict:
    """What a problem says, as the members of one item of a list (a batch's `failed`)."""
    return {"status": problem.status_code, "type": problem.type_uri, "title": problem.title,
            "detail": problem.description, **problem.members}


def serialize_problem(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    status = exc.status_code
    title = exc.title
    if title is None or title == exc.status:
        title = HTTPStatus(status).phrase  # Falcon's defaults are the status line ("404 Not Found").
    body = {
        "type": getattr(exc, "type_uri", "about:blank"),
        "title": title,
        "status": status,
        "detail": exc.description or title,
        "request_id": getattr(req.context, "request_id", None) or request_id_var.get(),
    }
    body.update(getattr(exc, "members", {}))
    resp.content_type = PROBLEM_JSON
    resp.text = json.dumps(body, ensure_ascii=False)


def _store_busy(req, resp, ex, params):
    raise Problem(503, "busy", "the database is busy with other writes; nothing was stored, retry shortly",
                  headers={"Retry-After": "1"})


def _store_unavailable(req, resp, ex, params):
    log.error("database unavailable: %s", ex)
    raise Problem(503, "unavailable", "the database is unavailable right now; retry later",
                  headers={"Retry-After": "5"})


def _version_mismatch(req, resp, ex, params):
    raise Problem(412, "version-mismatch", f"If-Match does not name the current version of this record ({ex.current});"
                  " nothing was changed: read the record again, then retry")


def _already_voided(req, resp, ex, params):
    raise Problem(409, "already-voided", "the record is already entered-in-error; nothing was changed")


def _unexpected(req, resp, ex, params):
    # Deliberately broad: this is the last line between an unforeseen failure and the client.
    log.exception("unhandled error while serving %s %s", req.method, req.path)
    raise Problem(500, "internal", "something failed on our side; quote the request_id when reporting it",
                  title="Internal Server Error")


def install(app: falcon.App) -> None:
    app.set_error_serializer(serialize_problem)
    app.add_error_handler(Exception, _unexpected)
    app.add_error_handler(StoreBusy, _store_busy)
    app.add_error_handler(StoreUnavailable, _store_unavailable)
    app.add_error_handler(VersionMismatch, _version_mismatch)
    app.add_error_handler(AlreadyVoided, _already_voided)
