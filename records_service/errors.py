"""Domain errors, and their one translation into RFC 9457 problem+json answers.

The store raises domain errors (`store.errors`, no HTTP there); `DOMAIN_PROBLEMS` below is the
one table that says what each is over HTTP. Resources raise `Problem`s; everything a client sees
as an error passes through `serialize_problem`, so every error body has the same shape and carries
the request ID. Unexpected exceptions are logged with their traceback and answered with a
bare 500 that reveals nothing else.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

import falcon

from .logs import request_id_var
from .store.errors import (AlreadyVoided, StoreBusy, StoreCorrupt, StoreError, StoreFull, StoreReadOnly,
                           StoreUnavailable, VersionMismatch)

log = logging.getLogger("records_service.errors")

PROBLEM_JSON = "application/problem+json"
_TYPE_PREFIX = "urn:records-service:problem:"


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


# What each domain error is over HTTP: (status, problem kind, detail for the client (a format
# string of `exc`), Retry-After seconds or None). The most specific class first: a lookup walks the exception's classes.
# Details never carry the error's own message (SQL, paths): that goes to the log.
DOMAIN_PROBLEMS: dict[type, tuple[int, str, str, int | None]] = {
    StoreBusy: (503, "busy", "the database is busy with other writes; nothing was stored, retry shortly", 1),
    StoreFull: (503, "storage-full", "the database's disk is full; nothing was stored, retry later", 30),
    StoreReadOnly: (503, "read-only", "the database cannot be written right now; nothing was stored, retry later", 30),
    StoreCorrupt: (503, "unavailable", "the database is unavailable right now; retry later", 30),
    StoreUnavailable: (503, "unavailable", "the database is unavailable right now; retry later", 5),
    VersionMismatch: (412, "version-mismatch", 'If-Match does not name the current version of this record ("{exc.current}");'
                      " nothing was changed: read the record again, then retry", None),
    AlreadyVoided: (409, "already-voided", "the record is already entered-in-error; nothing was changed", None),
}


def domain_problem(exc: Exception) -> Problem:
    """The problem a domain error answers, by DOMAIN_PROBLEMS."""
    status, kind, detail, retry_after = next(DOMAIN_PROBLEMS[cls] for cls in type(exc).__mro__
                                             if cls in DOMAIN_PROBLEMS)
    return Problem(status, kind, detail.format(exc=exc), headers={"Retry-After": str(retry_after)} if retry_after else None)


def _domain_error(req, resp, ex, params):
    if isinstance(ex, StoreError) and not isinstance(ex, StoreBusy):
        log.error("database unavailable: %s", ex)
    problem = domain_problem(ex)
    hint = getattr(req.context, "if_match_hint", None)
    if isinstance(ex, VersionMismatch) and hint:
        # If-Match named no version by its form (`1` for `"1"`): say how to write it, not only
        # that it is stale, which reads as nonsense when the bare number is the current version.
        problem.description = problem.description.replace("read the record again, then retry", hint)
    raise problem


def _unexpected(req, resp, ex, params):
    # Deliberately broad: this is the last line between an unforeseen failure and the client.
    log.exception("unhandled error while serving %s %s", req.method, req.path)
    raise Problem(500, "internal", "something failed on our side; quote the request_id when reporting it",
                  title="Internal Server Error")


def install(app: falcon.App) -> None:
    app.set_error_serializer(serialize_problem)
    app.add_error_handler(Exception, _unexpected)
    for domain_error in DOMAIN_PROBLEMS:
        app.add_error_handler(domain_error, _domain_error)
