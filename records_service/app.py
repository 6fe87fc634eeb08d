"""The application factory: gunicorn calls `create_app()` in each worker, tests call it directly."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from typing import Callable

import falcon

from . import errors
from .config import Settings, load_settings
from .middleware import Authenticate, RequestContext
from .resources import Health, TestsCollection
from .store import Store

log = logging.getLogger("records_service.app")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def create_app(settings: Settings | None = None, *, clock: Callable[[], datetime] = utc_now) -> falcon.App:
    """Build the WSGI app. Without `settings`, they are read from the environment of this process
    (which gunicorn.conf.py has already validated and filled from `.env`)."""
    settings = settings or load_settings(os.environ)
    store = Store(settings.db_path, synchronous=settings.synchronous, busy_timeout_ms=settings.busy_timeout_ms)
    try:
        store.open()
    except (errors.StoreUnavailable, errors.StoreBusy) as exc:
        # Keep serving: /health answers and the store retries on the next request that needs it.
        log.error("database not ready at start-up: %s", exc)

    if settings.auth == "disabled":
        # Once per worker start: an operator must not miss that every request is served as admin.
        log.warning("access control is DISABLED (RECORDS_AUTH=disabled): every request is served "
                    "without a key, as admin; use this only for local experiments", extra={"pid": os.getpid()})

    authenticate = Authenticate(store, required=settings.auth == "required")
    app = falcon.App(middleware=[RequestContext(), authenticate])
    errors.install(app)
    app.add_route("/health", Health())
    app.add_route("/tests", TestsCollection(store, clock, settings.max_body_bytes))
    authenticate.learn_routes(app)  # after the last add_route
    return app
