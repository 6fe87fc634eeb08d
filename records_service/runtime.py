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

_HEADER = struct.Struct("<Q")  # how many failures were ever recorded
SLOTS = 50
MAX_CHARS = 120  # per string value: even fully \u-escaped (6 bytes a character), five fit a slot
_SLOT_BYTES = 4096


class FailureLog:
    """The last `SLOTS` failures, one JSON object each, in a ring that forked processes share.

    The ring is an anonymous in-memory file: writes and reads use pwrite/pread at fixed
    offsets under a POSIX record lock, which belongs to the process holding it, so forked
    workers exclude each other, and the kernel releases it if a worker dies mid-write.
    """

    def __init__(self) -> None:
        self._fd = _anonymous_file(_HEADER.size + SLOTS * _SLOT_BYTES)
        self._thread_lock = threading.Lock()  # POSIX locks do not exclude threads of one process

    def record(self, entry: dict) -> None:
        """Keep `entry` (a flat dict of strings and numbers); long strings are cut so one fits a slot."""
        cut = {k: v[:MAX_CHARS] if isinstance(v, str) else v for k, v in entry.items()}
        data = json.dumps(cut, ensure_ascii=True, separators=(",", ":")).encode()
        if len(data) > _SLOT_BYTES:
            raise ValueError(f"a failure entry must fit {_SLOT_BYTES} bytes (got {len(data)})")
        with self._locked(fcntl.LOCK_EX):
            (count,) = _HEADER.unpack(os.pread(self._fd, _HEADER.size, 0))
            os.pwrite(self._fd, data.ljust(_SLOT_BYTES, b" "), _HEADER.size + (count % SLOTS) * _SLOT_BYTES)
            os.pwrite(self._fd, _HEADER.pack(count + 1), 0)

    def recent(self) -> tuple[int, list[dict]]:
        """(failures ever recorded, the last ones newest first)."""
        with self._locked(fcntl.LOCK_SH):
            raw = os.pread(self._fd, _HEADER.size + SLOTS * _SLOT_BYTES, 0)
        (count,) = _HEADER.unpack_from(raw)
        entries = []
        for n in range(count - 1, max(count - SLOTS, 0) - 1, -1):
            start = _HEADER.size + (n % SLOTS) * _SLOT_BYTES
            entries.append(json.loads(raw[start:start + _SLOT_BYTES]))
        return count, entries

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
