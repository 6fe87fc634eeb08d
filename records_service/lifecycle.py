"""One record's lifecycle over HTTP: read it, correct it, void it, its history; what a request wrote.

A record of a clinic the caller may not see answers exactly as a record that does not exist
(404), so its existence is not revealed. Writes are conditional: If-Match must name the version
the client read, and the store compares it inside the write transaction.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Callable

import falcon

from .errors import Problem
from .resources import JSON, read_json, require_valid
from .store import Store, Stored
from .validate import check_id, utc_millis, validate_correction

# RFC 9110 entity-tag: [W/] DQUOTE *etagc DQUOTE, etagc = %x21 / %x23-7E / obs-text.
_TAG = r'(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"'
# A list of tags; RFC 9110 #rule lets a recipient accept empty elements ("a", , "b").
_TAG_LIST = re.compile(rf"[ \t]*(?:{_TAG})?(?:[ \t]*,[ \t]*(?:{_TAG})?)*[ \t]*")
_TAG_PARTS = re.compile(r'(W/)?"([^"]*)"')
_VERSION = re.compile(r"[1-9][0-9]*", re.ASCII)


def versions_named(if_match: str | None) -> frozenset[int] | None:
    """The record versions an If-Match value names; None when it is absent or blank (-> 428).

    What names nothing, and so fails against any version (-> 412):
    - a weak tag (W/"3"): If-Match compares strongly (RFC 9110 13.1.1);
    - `*`: RFC 9110 lets it match any current record, but then a client could overwrite a
      version it never read, which is exactly what requiring If-Match prevents;
    - a tag that is not a version as the service writes it ("03", "abc"), or a malformed value.
    A list matches when any strong tag in it names the current version, as RFC 9110 says.
    """
    if if_match is None or not if_match.strip():
        return None
    if not _TAG_LIST.fullmatch(if_match):
        return frozenset()
    return frozenset(int(opaque) for weak, opaque in _TAG_PARTS.findall(if_match)
                     if not weak and _VERSION.fullmatch(opaque))


def required_versions(req: falcon.Request) -> frozenset[int]:
    """The versions If-Match names (428 without it); a value that names none by its form leaves
    `req.context.if_match_hint` for the 412 it will get (errors: VersionMismatch)."""
    if_match = req.get_header("If-Match")
    versions = versions_named(if_match)
    if versions is None:
        raise Problem(428, "precondition-required",
                      'If-Match is required: send the ETag of the version you read, e.g. If-Match: "1"')
    if not versions:
        req.context.if_match_hint = if_match_hint(if_match)
    return versions


def if_match_hint(if_match: str) -> str:
    """Why an If-Match value names no version, said so that a client can fix it."""
    parts = [part.strip() for part in if_match.split(",")]
    bare = next((part for part in parts if _VERSION.fullmatch(part)), None)
    if bare is not None:
        return f'If-Match carries the version quoted, as the ETag does: If-Match: "{bare}", not {bare}'
    if "*" in parts:
        return 'If-Match: * is not accepted: name the version you read, e.g. If-Match: "1"'
    weak = next((opaque for weak, opaque in _TAG_PARTS.findall(if_match) if weak and _VERSION.fullmatch(opaque)), None)
    if weak is not None:
        return f'a weak tag (W/"{weak}") never matches, If-Match compares strongly: send If-Match: "{weak}"'
    return 'If-Match carries the ETag as it came, a quoted version such as "1"'


def visible_record(store: Store, req: falcon.Request, test_id: str) -> Stored:
    """The record's current version, or 404 when it does not exist or the caller may not see it."""
    stored = store.current(test_id) if check_id(test_id) is None else None
    if stored is None or not req.context.principal.sees(stored.clinic_id):
        raise Problem(404, "not-found", "no record with this test_id")
    return stored


def answer_record(resp: falcon.Response, stored: Stored) -> None:
    resp.content_type = JSON
    resp.text = stored.doc
    resp.set_header("ETag", f'"{stored.version}"')


class Record:
    """GET /tests/{test_id} (read), PUT (correct: a new version), DELETE (void: a new version)."""

    def __init__(self, store: Store, clock: Callable[[], datetime], max_body_bytes: int) -> None:
        self._store = store
        self._clock = clock
        self._max_body_bytes = max_body_bytes

    def on_get(self, req: falcon.Request, resp: falcon.Response, test_id: str) -> None:
        answer_record(resp, visible_record(self._store, req, test_id))

    def on_put(self, req: falcon.Request, resp: falcon.Response, test_id: str) -> None:
        current = visible_record(self._store, req, test_id)
        expected = required_versions(req)
        doc = read_json(req, self._max_body_bytes)
        now = self._clock()
        record = require_valid(validate_correction(doc, json.loads(current.doc), now))
        answer_record(resp, self._store.correct(record, expected=expected, request_id=req.context.request_id,
                                                key_id=req.context.principal.key_id, now=utc_millis(now)))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, test_id: str) -> None:
        visible_record(self._store, req, test_id)
        expected = required_versions(req)
        answer_record(resp, self._store.void(test_id, expected=expected, request_id=req.context.request_id,
                                             key_id=req.context.principal.key_id, now=utc_millis(self._clock())))


class History:
    """GET /tests/{test_id}/history: every version, oldest first, each as it was."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response, test_id: str) -> None:
        visible_record(self._store, req, test_id)
        body, count = self._store.history_json(test_id)
        req.context.log_fields = {"count": count}
        resp.content_type = JSON
        resp.text = body


class Audit:
    """GET /audit/{request_id}: what one request wrote (admin), each write with its clinic and the
    key that made it, since clients choose request IDs and two keys may share one. Any string may
    be asked about; one no request ever had simply wrote nothing."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response, request_id: str) -> None:
        sees = req.context.principal.sees
        writes = [w for w in self._store.audit(request_id) if sees(w["clinic_id"])]
        req.context.log_fields = {"count": len(writes)}
        resp.media = writes
