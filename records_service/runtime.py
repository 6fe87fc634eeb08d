"""What every worker of one gunicorn master shares: when the service started, what failed lately.

gunicorn.conf.py calls `share()` in the master, before any worker is forked, so every worker
inherits the same start time (uptime is the service's, not a worker's) and the same
`FailureLog`. An app built without a gunicorn master (tests, another WSGI server) gets a
private one from `current()`.

The failure log lives in memory, outside the database: the failures worth showing (a locked
or missing database) are exactly the moments the database cannot record them.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

_HEADER = struct.Struct("<QQ")  # entries written to the ring, failures recorded
SLOTS = 50
MAX_CHARS = 120  # per string value: even fully \u-escaped (6 bytes a character), five fit a slot
_SLOT_BYTES = 4096
# A failure that repeats the newest entry in these members adds to its `repeats` instead of
# taking a slot, so a readiness probe failing every few seconds does not push out the rest.
SAME_FAILURE = ("status", "type", "method", "path")


class FailureLog:
    """The last `SLOTS` distinct failures, one JSON object each, in a ring forked processes share.

    The ring is an anonymous in-memory file: writes and reads use pwrite/pread at fixed
    offsets under a POSIX record lock, which belongs to the process holding it, so forked
    workers exclude each other, and the kernel releases it if a worker dies mid-write.
    """

    def __init__(self) -> None:
        self._fd = _anonymous_file(_HEADER.size + SLOTS * _SLOT_BYTES)
        self._thread_lock = threading.Lock()  # POSIX locks do not exclude threads of one process

    def record(self, entry: dict) -> None:
        """Keep `entry` (a flat dict of strings and numbers); long strings are cut so one fits a slot."""
        entry = {k: v[:MAX_CHARS] if isinstance(v, str) else v for k, v in entry.items()}
        with self._locked(fcntl.LOCK_EX):
            written, failures = _HEADER.unpack(os.pread(self._fd, _HEADER.size, 0))
            newest = self._slot(written - 1) if written else None
            if newest is not None and all(newest.get(k) == entry.get(k) for k in SAME_FAILURE):
                self._write_slot(written - 1, {**entry, "repeats": newest.get("repeats", 1) + 1})
            else:
                self._write_slot(written, {**entry, "repeats": 1})
                written += 1
            os.pwrite(self._fd, _HEADER.pack(written, failures + 1), 0)

    def recent(self) -> tuple[int, list[dict]]:
        """(failures ever recorded, the last distinct ones newest first, each with its `repeats`)."""
        with self._locked(fcntl.LOCK_SH):
            written, failures = _HEADER.unpack(os.pread(self._fd, _HEADER.size, 0))
            return failures, [self._slot(n) for n in range(written - 1, max(written - SLOTS, 0) - 1, -1)]

    def _slot(self, n: int) -> dict:
        return json.loads(os.pread(self._fd, _SLOT_BYTES, _HEADER.size + (n % SLOTS) * _SLOT_BYTES))

    def _write_slot(self, n: int, entry: dict) -> None:
        data = json.dumps(entry, ensure_ascii=True, separators=(",", ":")).encode()
        if len(data) > _SLOT_BYTES:
            raise ValueError(f"a failure entry must fit {_SLOT_BYTES} bytes (got {len(data)})")
        os.pwrite(self._fd, data.ljust(_SLOT_BYTES, b" "), _HEADER.size + (n % SLOTS) * _SLOT_BYTES)

    @contextmanager
    def _locked(self, kind: int) -> Iterator[None]:
        with self._thread_lock:
            fcntl.lockf(self._fd, kind)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)


def _anonymous_file(size: int) -> int:
    """A zero-filled file with no name, inherited across fork (never across exec)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("records_service-failures", os.MFD_CLOEXEC)
    else:
        handle = tempfile.TemporaryFile()
        fd = os.dup(handle.fileno())
        handle.close()
    os.ftruncate(fd, size)
    return fd


@dataclass(frozen=True)
class Runtime:
    started_at: float  # time.time() when the service (the gunicorn master, or this app) started
    failures: FailureLog


_shared: Runtime | None = None


def share() -> Runtime:
    """Create the master's runtime once; a configuration reload (SIGHUP) keeps it."""
    global _shared
    if _shared is None:
        _shared = Runtime(started_at=time.time(), failures=FailureLog())
    return _shared


def current() -> Runtime:
    """The runtime inherited from the gunicorn master, or a private one for this app."""
    return _shared or Runtime(started_at=time.time(), failures=FailureLog())
