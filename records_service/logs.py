"""JSON log lines that carry the request ID, and the logging dict gunicorn reuses.

The request ID travels on `req.context`; `request_id_var` is only the bridge that lets the
formatter see it from any logger (ours, gunicorn's, sqlite helpers) while a request is served.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from functools import lru_cache

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
# The public id of the API key a request authenticated with, set by middleware.Authenticate.
key_id_var: ContextVar[str | None] = ContextVar("key_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


# Built once: json.dumps with options builds a new encoder for every line.
_encode = json.JSONEncoder(default=str, ensure_ascii=False).encode


@lru_cache(maxsize=4)
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, key_id, then any extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": f"{_utc_second(int(record.created))}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        key_id = key_id_var.get()
        if key_id is not None:
            entry["key_id"] = key_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return _encode(entry)


def skip_unlogged_lookups() -> None:
    """Stop `logging` from walking the stack for each record's file and line (it was a fifth of a
    POST's time) and from looking up the thread and process names: our lines show none of them.
    The switches the logging HOWTO's "Optimization" names."""
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def logging_config(level: str = "INFO") -> dict:
    """A dictConfig for the app and for gunicorn (`logconfig_dict`): everything as JSON on stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"},
            "discard": {"class": "logging.NullHandler"},
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            # The app logs its own completion line, with the request ID; gunicorn's access line
            # comes after the request's context is gone and could not carry it.
            "gunicorn.access": {"handlers": ["discard"], "propagate": False},
        },
    }
