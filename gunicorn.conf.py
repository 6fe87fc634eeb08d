"""gunicorn settings for records_service: `gunicorn -c gunicorn.conf.py [-b HOST:PORT]`.

This file runs once in the gunicorn master, before any worker exists: it loads `.env`,
validates the configuration (a bad value stops start-up with one line naming the variable)
and hands gunicorn the same JSON logging the application uses.
"""

import multiprocessing
import os
import sys

# gunicorn reads this file before it puts the working directory on sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from records_service import runtime
from records_service.config import ConfigError, load_dotenv_file, load_settings
from records_service.logs import logging_config

# -- configuration -------------------------------------------------------------------------
# Real environment variables win over `.env`; workers inherit the merged environment.
load_dotenv_file()
try:
    settings = load_settings(os.environ)
except ConfigError as exc:
    sys.exit(f"records_service: configuration error: {exc}")

# -- the application -----------------------------------------------------------------------
# A factory call, evaluated in each worker after fork: no SQLite connection is ever inherited.
wsgi_app = "records_service.app:create_app()"
preload_app = False

# -- shared runtime state ------------------------------------------------------------------
# Made here, in the master, before any fork: every worker inherits the same start time (the
# dashboard's uptime is the service's) and the same log of recent failures. A reload (HUP)
# keeps both; nothing in it touches the database.
runtime.share()

# -- sockets -------------------------------------------------------------------------------
# Loopback by default; put a reverse proxy in front, or pass -b 0.0.0.0:8000 deliberately.
bind = "127.0.0.1:8000"

# -- workers -------------------------------------------------------------------------------
# Sync workers: one request at a time per process, so one SQLite connection per worker is
# enough and a slow client cannot hold a connection another request needs.
worker_class = "sync"
workers = multiprocessing.cpu_count() * 2 + 1
# A request waits at most RECORDS_BUSY_TIMEOUT_MS for the write lock; keep well above it.
timeout = 30
# SIGTERM: workers finish the request in hand, for up to this many seconds.
graceful_timeout = 30

# -- logging -------------------------------------------------------------------------------
# JSON lines on stderr, gunicorn's own included. The app writes its own completion line per
# request (with the request ID), so gunicorn's access log stays off.
logconfig_dict = logging_config(settings.log_level)
accesslog = None

# -- control socket ------------------------------------------------------------------------
# gunicorn 27 opens a control socket at a fixed path in $HOME by default: two instances on one
# host would collide. Nothing here uses it.
control_socket_disable = True
