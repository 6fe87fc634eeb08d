"""The application factory: gunicorn calls `create_app()` in each worker, tests call it directly."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from typing import Callable

import falcon

from . import errors, runtime
from .body_deadline import BodyTimeout
from .collection import Batch, Export, Stats
from .config import Settings, load_settings
from .lifecycle import Audit, History, Record
from .logs import skip_unlogged_lookups
from .middleware import Authenticate, RequestContext
from .operations import Dashboard, FailureRecorder, OpenAPIDocument, Ready
from .resources import Health, TestsCollection
from .runtime import Runtime
from .store import StoreError, open_store

log = logging.getLogger("records_service.app")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def answering_head(resource):
    """The resource, its GET responder also answering HEAD (RFC 9110 9.3.2): the same status and
    headers, and Falcon leaves the body out. A responder that streams checks `req.method` itself."""
    if hasattr(resource, "on_get") and not hasattr(resource, "on_head"):
        resource.on_head = resource.on_get
    return resource


def create_app(settings: Settings | None = None, *, clock: Callable[[], datetime] = utc_now,
               shared: Runtime | None = None, writers: int | None = None) -> falcon.App:
    """Build the WSGI app. Without `settings`, they are read from the environment of this process
    (which gunicorn.conf.py has already validated and filled from `.env`). Without `shared`,
    the runtime state comes from the gunicorn master (see runtime.share) or is this app's own.
    `writers` bounds how many of this process's threads may wait to write (gunicorn.conf.py)."""
    settings = settings or load_settings(os.environ)
    shared = shared or runtime.current()
    skip_unlogged_lookups()
    store = open_store(settings, writers=writers)
    try:
        store.open()
    except StoreError as exc:
        # Keep serving: /health answers and the store retries on the next request that needs it.
        log.error("database not ready at start-up: %s", exc)

    if settings.auth == "disabled":
        # Once per worker start: an operator must not miss that every request is served as admin.
        log.warning("access control is DISABLED (RECORDS_AUTH=disabled): every request is served "
                    "without a key, as admin; use this only for local experiments", extra={"pid": os.getpid()})

    authenticate = Authenticate(store, required=settings.auth == "required")
    app = falcon.App(middleware=[RequestContext(), BodyTimeout(settings.body_timeout_ms), authenticate,
                                 FailureRecorder(shared.failures, clock)])
    errors.install(app)
    routes = {
        "/": Dashboard(store, shared, clock),
        "/health": Health(),
        "/ready": Ready(store),
        "/openapi.json": OpenAPIDocument(),
        "/tests": TestsCollection(store, clock, settings.max_body_bytes),
        "/tests/_batch": Batch(store, clock, settings.max_batch_bytes),
        "/tests/_export": Export(store),
        "/tests/_stats": Stats(store),
        "/tests/{test_id}": Record(store, clock, settings.max_body_bytes),
        "/tests/{test_id}/history": History(store),
        "/audit/{request_id}": Audit(store),
    }
    for path, resource in routes.items():
        app.add_route(path, answering_head(resource))
    authenticate.learn_routes(app)  # after the last add_route
    return app
