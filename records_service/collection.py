"""The collection at scale: POST /tests/_batch, GET /tests/_export, GET /tests/_stats.

A batch is judged record by record, as POST /tests would judge each one (the same problems,
listed in `failed` with the record's 0-based index), and what passes is stored in one
transaction. An export streams NDJSON straight from a database cursor, so memory stays flat
however many records match.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Callable, Generator, Iterable, Iterator

import falcon

from .access import Principal, clinic_forbidden
from .errors import Problem, duplicate_record, invalid_parameter, invalid_record, malformed_json, problem_fields
from .logs import request_id_var
from .resources import JSON, clinic_query, media_type, query_params, read_body
from .store import Store
from .validate import (InvalidBatch, MalformedJSON, TooManyRecords, check_id, client_fields, parse_batch, utc_millis,
                       validate_record)

log = logging.getLogger("records_service.http")

NDJSON = "application/x-ndjson"
MAX_BATCH_RECORDS = 10_000


def _atomic(raw: str | None) -> bool:
    if raw not in (None, "true", "false"):
        raise invalid_parameter("atomic", "must be true or false")
    return raw == "true"


def _sent_test_id(doc) -> str | None:
    """The test_id a failed record carried, when it is a well-formed one; null otherwise."""
    test_id = doc.get("test_id") if isinstance(doc, dict) else None
    return test_id if check_id(test_id) is None else None


def _triage(items: Iterable, now: datetime, principal: Principal) -> tuple[list[tuple[int, dict]], dict[int, dict]]:
    """Split a batch into the records to store, (index, record) in order, and failures by index.

    A test_id repeated in the batch: its first valid occurrence wins, the others are 409s,
    `identical` when they say the same as that first occurrence.
    """
    accepted: list[tuple[int, dict]] = []
    failed: dict[int, dict] = {}
    first_seen: dict[str, tuple[int, dict]] = {}

    def fail(index: int, test_id: str | None, problem: Problem) -> None:
        failed[index] = {"index": index, "test_id": test_id, **problem_fields(problem)}

    for index, item in enumerate(items):
        if isinstance(item, MalformedJSON):
            fail(index, None, malformed_json(str(item)))
            continue
        record, errors = validate_record(item, now)
        if errors:
            fail(index, _sent_test_id(item), invalid_record(errors))
            continue
        test_id = record["test_id"]
        if not principal.sees(record["clinic_id"]):
            fail(index, test_id, clinic_forbidden(record["clinic_id"]))
            continue
        first = first_seen.get(test_id)
        if first is not None:
            fail(index, test_id, duplicate_record(
                test_id, record == first[1],
                f"test_id {test_id} appears earlier in this batch (index {first[0]}); the first occurrence wins"))
            continue
        first_seen[test_id] = (index, record)
        accepted.append((index, record))
    return accepted, failed


def _stored_duplicates(accepted: list[tuple[int, dict]], existing: dict[str, dict], failed: dict[int, dict]) -> None:
    if not existing:
        return
    for index, record in accepted:
        stored = existing.get(record["test_id"])
        if stored is not None:
            failed[index] = {"index": index, "test_id": record["test_id"],
                             **problem_fields(duplicate_record(record["test_id"], client_fields(stored) == record))}


def _rejected(received: int, failed: list[dict]) -> Problem:
    """An atomic batch that stored nothing: 403 if a record was for a forbidden clinic, 409 if
    every failure is a duplicate, else 400; the body carries the whole `failed` list."""
    statuses = {f["status"] for f in failed}
    status = 403 if 403 in statuses else 409 if statuses == {409} else 400
    return Problem(status, "batch-rejected", f"{len(failed)} of {received} records failed; nothing was stored",
                   title="Batch not stored", received=received, created=0, failed=failed)


class Batch:
    """POST /tests/_batch: many records, NDJSON or a JSON array, each judged on its own."""

    def __init__(self, store: Store, clock: Callable[[], datetime], max_batch_bytes: int) -> None:
        self._store = store
        self._clock = clock
        self._max_batch_bytes = max_batch_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        atomic = _atomic(query_params(req, allowed={"atomic"}, required=set()).get("atomic"))
        body = read_body(req, self._max_batch_bytes, accepted=(JSON, NDJSON))
        now = self._clock()
        try:
            items = parse_batch(body, ndjson=media_type(req) == NDJSON, max_records=MAX_BATCH_RECORDS)
            accepted, failed = _triage(items, now, req.context.principal)
        except MalformedJSON as exc:
            raise malformed_json(str(exc)) from None
        except InvalidBatch as exc:
            raise Problem(400, "invalid-batch", str(exc), title="Invalid batch") from None
        except TooManyRecords as exc:
            raise Problem(413, "too-many-records", str(exc)) from None
        received = len(accepted) + len(failed)
        records = [record for _, record in accepted]
        if atomic and failed:
            existing = self._store.existing([record["test_id"] for record in records])
        else:
            existing = self._store.insert_batch(records, request_id=req.context.request_id,
                                                key_id=req.context.principal.key_id, now=utc_millis(now),
                                                atomic=atomic)
        _stored_duplicates(accepted, existing, failed)

        outcome = {"received": received, "created": 0 if atomic and failed else len(records) - len(existing),
                   "failed": [failed[index] for index in sorted(failed)]}
        # ("created" would clash with a LogRecord attribute.)
        req.context.log_fields = {"received": received, "stored": outcome["created"], "failed": len(failed)}
        if atomic and failed:
            raise _rejected(received, outcome["failed"])
        resp.status = falcon.HTTP_201 if atomic else falcon.HTTP_200
        resp.media = outcome


class Export:
    """GET /tests/_export?clinic_id=: every matching record as NDJSON, streamed from the database."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        query, _ = clinic_query(req)
        chunks = self._store.export_docs(query["filters"])
        # Fetched here, before any byte is sent: a database that fails this early gets the
        # ordinary problem answer (and status in the completion line), not a broken stream.
        first = next(chunks, [])
        resp.content_type = NDJSON
        if req.method == "HEAD":
            chunks.close()
            resp.stream = iter(())  # a stream: no Content-Length, as GET has none
            return
        resp.stream = _ndjson(first, chunks, req.context.request_id)


class ExportAborted(Exception):
    """Raised out of an export's stream so that the server aborts the response."""


def _ndjson(first: list[str], chunks: Generator[list[str], None, None], request_id: str) -> Iterator[bytes]:
    """Encode the chunks, `first` then the rest, as NDJSON lines, then log the export's own
    completion line.

    It runs after the middleware has logged the request (status 200) and let go of its request
    ID, so it carries the ID itself. A database error once the response is under way can no
    longer change its status: it is logged as the export's failure, with its cause, and raised,
    so the server aborts the response without its terminating chunk and the client sees a
    truncated stream, never a clean end.
    """
    started = time.perf_counter()
    count = 0
    outcome, cause = "export stopped before the end", None  # the client went away (GeneratorExit)
    try:
        docs = first
        while docs:
            count += len(docs)
            yield ("\n".join(docs) + "\n").encode("utf-8")
            docs = next(chunks, None)
        outcome = "export completed"
    except Exception as exc:
        # Deliberately broad: whatever broke mid-stream, the response cannot be completed.
        outcome, cause = "export failed", f"{type(exc).__name__}: {exc}"
        # The server logs what it aborted after this generator has let go of the request ID:
        # the ID in the message still finds that line with grep.
        raise ExportAborted(f"export of request {request_id} aborted after {count} records") from exc
    finally:
        chunks.close()
        token = request_id_var.set(request_id)
        try:
            fields = {"count": count, "duration_ms": round((time.perf_counter() - started) * 1000, 3)}
            if cause:
                log.error(outcome, extra={**fields, "error": cause})
            else:
                log.info(outcome, extra=fields)
        finally:
            request_id_var.reset(token)


class Stats:
    """GET /tests/_stats?clinic_id=: the clinic at a glance."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        query, _ = clinic_query(req, filter_names=())
        resp.media = self._store.clinic_stats(query["filters"]["clinic_id"])
