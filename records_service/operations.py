"""Operations endpoints: readiness, the OpenAPI document, the dashboard; and the failure recorder.

Thin resources: the store gathers figures, `dashboard` renders them, `runtime` holds what all
workers share (start time, recent failures).
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timedelta, timezone
from importlib import resources as package_files
from typing import Callable

import falcon

from . import __version__, dashboard
from .errors import PROBLEM_JSON, Problem, domain_problem
from .runtime import FailureLog, Runtime
from .store import Store, StoreBusy, StoreError
from .validate import utc_millis

log = logging.getLogger("records_service.operations")

HTML = "text/html; charset=utf-8"
# The dashboard needs nothing but itself: no script, image, font, frame or connection anywhere.
DASHBOARD_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


class Ready:
    """GET /ready: 200 with the version and the database's state when this worker can read and write; else 503."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            state = self._store.readiness()
        except StoreError as exc:
            if not isinstance(exc, StoreBusy):
                log.error("not ready: %s", exc)  # the real cause, for the operator
            cause = domain_problem(exc)
            raise Problem(503, "not-ready", f"not ready: {cause.description}", title="Not ready",
                          headers=cause.headers, reason=cause.type_uri.rsplit(":", 1)[-1]) from None
        resp.media = {"status": "ready", "version": __version__, **state}


class OpenAPIDocument:
    """GET /openapi.json: the hand-written document kept in the package, served byte for byte."""

    def __init__(self) -> None:
        self._document = package_files.files(__package__).joinpath("openapi.json").read_bytes()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._document


class Dashboard:
    """GET /: the dashboard for people. Figures come from counters, never from scanning records."""

    def __init__(self, store: Store, runtime: Runtime, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._runtime = runtime
        self._clock = clock

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        now = self._clock()
        db, problem, imports = None, None, ()
        try:
            db = self._store.dashboard_counts(
                since_hour=dashboard.hour_key(now - timedelta(hours=dashboard.CHART_HOURS - 1)),
                top_clinics=dashboard.TOP_CLINICS)
            imports = tuple(self._store.import_runs())
        except StoreBusy:
            problem = "The database stayed locked past the busy bound; its figures are missing from this page."
        except StoreError as exc:
            log.error("dashboard without database figures: %s", exc)
            problem = "The database cannot be opened or read; its figures are missing from this page."
        failures_total, failures = self._runtime.failures.recent()
        view = dashboard.DashboardView(generated_at=now,
                                       started_at=datetime.fromtimestamp(self._runtime.started_at, timezone.utc),
                                       uptime_s=time.time() - self._runtime.started_at,
                                       pid=os.getpid(), db=db, db_problem=problem,
                                       failures_total=failures_total, failures=failures, imports=imports)
        # A page that cannot show the database says so with 503, so a monitor notices too.
        resp.status = falcon.HTTP_200 if db is not None else falcon.HTTP_503
        resp.content_type = HTML
        resp.set_header("Content-Security-Policy", DASHBOARD_CSP)
        resp.set_header("Cache-Control", "no-store")
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.text = dashboard.render(view)


class FailureRecorder:
    """Middleware: every response with status >= 500 goes into the failure log all workers share."""

    def __init__(self, failures: FailureLog, clock: Callable[[], datetime]) -> None:
        self._failures = failures
        self._clock = clock

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        if resp.status_code < 500:
            return
        self._failures.record({
            "at": utc_millis(self._clock()), "status": resp.status_code, "type": _problem_type(resp),
            "method": req.method, "path": req.path, "request_id": getattr(req.context, "request_id", None),
            "pid": os.getpid(),
        })


def _problem_type(resp: falcon.Response) -> str | None:
    """The last part of a problem's `type` URI (busy, not-ready, internal ...), when there is one."""
    if resp.content_type != PROBLEM_JSON or not isinstance(resp.text, str):
        return None
    try:
        return json.loads(resp.text).get("type", "").rsplit(":", 1)[-1] or None
    except ValueError:
        return None  # not our serializer's JSON: record the failure without a type
