"""gunicorn settings for records_service: `gunicorn -c gunicorn.conf.py [-b HOST:PORT]`.

This file runs once in the gunicorn master, before any worker exists: it loads `.env`,
validates the configuration (a bad value stops start-up with one line naming the variable)
and hands gunicorn the same JSON logging the application uses.
"""

import multiprocessing
import os
import signal
import sys

# gunicorn reads this file before it puts the working directory on sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from records_service import runtime
from records_service.config import ConfigError, load_dotenv_file, load_settings, unknown_variables
from records_service.logs import logging_config
from records_service.store import StoreError, open_store

# -- configuration -------------------------------------------------------------------------
# Real environment variables win over `.env`; workers inherit the merged environment.
load_dotenv_file()
try:
    settings = load_settings(os.environ)
except ConfigError as exc:
    sys.exit(f"records_service: configuration error: {exc}")

# -- workers -------------------------------------------------------------------------------
# Threads (gthread): each worker serves up to `threads` requests at once, each thread with its own
# database connection. A request waiting for the write lock holds only its thread, so reads go on
# while writes wait; at most `writers` threads of a worker wait to write at once, and a write past
# that is answered 503 at once, so waiting writes can never take every thread (docs/design.md).
# One worker per core: the threads share a core's worth of Python, and a slow client holds a
# thread, not a worker.
worker_class = "gthread"
workers = multiprocessing.cpu_count()
threads = 16
writers = threads - 4
# A request waits at most RECORDS_BUSY_TIMEOUT_MS for the write lock; keep well above it.
timeout = 30
# SIGTERM: workers finish the requests in hand, for up to this many seconds.
graceful_timeout = 30



def post_worker_init(worker):
    """Ctrl-C (SIGINT) or SIGQUIT makes a worker leave at once, as kill -9 would (a 201 is sent
    only after its commit; an unfinished write is rolled back by the database).

    gunicorn's own handler first shuts the worker's thread pool down, which takes the pool's
    lock: when the signal lands while the worker's main thread holds that lock (handing a
    connection to the pool), the handler waits for it forever and the master kills the worker
    only after graceful_timeout (30 s; seen in tests/test_readme.py under load). Letting Python
    wind down instead joins the request threads, and one caught mid-exchange held the worker
    for the whole graceful timeout too. SIGTERM still lets requests in hand finish."""
    signal.signal(signal.SIGINT, _leave_now)
    signal.signal(signal.SIGQUIT, _leave_now)


def _leave_now(signum, frame):
    os._exit(0)


# -- the application -----------------------------------------------------------------------
# A factory call, evaluated in each worker after fork: no database connection is ever inherited.
wsgi_app = f"records_service.app:create_app(writers={writers})"
preload_app = False


def on_starting(server):
    """Migrate once, in the master, before any worker exists: a long migration (issue 14's
    schema 8 rebuilds the records table) then never runs inside a worker's boot timeout, and the
    master's connections are closed before the first fork. If the database cannot be used now,
    the workers start anyway, answer /ready 503 and retry at their next request.
    First, once, a warning for each RECORDS_* variable that is no setting (a misspelling)."""
    for warning in unknown_variables(os.environ):
        server.log.warning(warning)
    store = open_store(settings)
    try:
        version = store.migrate()
        server.log.info("database ready at schema version %s", version)
    except StoreError as exc:
        server.log.error("database not migrated at start-up: %s", exc)
    finally:
        store.close()


# -- shared runtime state ------------------------------------------------------------------
# Made here, in the master, before any fork: every worker inherits the same start time (the
# dashboard's uptime is the service's) and the same log of recent failures. A reload (HUP)
# keeps both; nothing in it touches the database.
runtime.share()

# -- sockets -------------------------------------------------------------------------------
# Loopback by default; put a reverse proxy in front, or pass -b 0.0.0.0:8000 deliberately.
bind = "127.0.0.1:8000"

# -- logging -------------------------------------------------------------------------------
# JSON lines on stderr, gunicorn's own included. The app writes its own completion line per
# request (with the request ID), so gunicorn's access log stays off.
logconfig_dict = logging_config(settings.log_level)
accesslog = None

# -- control socket ------------------------------------------------------------------------
# gunicorn 27 opens a control socket at a fixed path in $HOME by default: two instances on one
# host would collide. Nothing here uses it.
control_socket_disable = True
