"""The application factory: gunicorn calls `create_app()` in each worker, tests call it directly."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from typing import Callable

import falcon

from . import errors
from .collection import Batch, Export, Stats
from .config import Settings, load_settings
from .middleware import RequestContext
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

    app = falcon.App(middleware=[RequestContext()])
    errors.install(app)
    app.add_route("/health", Health())
    app.add_route("/tests", TestsCollection(store, clock, settings.max_body_bytes))
    app.add_route("/tests/_batch", Batch(store, clock, settings.max_batch_bytes))
    app.add_route("/tests/_export", Export(store))
    app.add_route("/tests/_stats", Stats(store))
    return app
