"""A deadline for receiving a request body, so that a client sending slowly cannot hold a worker.

gunicorn reads a body only when the application asks for it, and a read blocks until the bytes
come: a client sending one byte a second, or stopping mid-body, would hold its worker (a whole
sync worker until gunicorn's WORKER TIMEOUT and an HTML 500, or a gthread thread for as long
as it likes). A socket timeout bounds each read, not the whole body, and one byte a second
beats any of them. So one watchdog thread per process shuts the read side of the socket when
a body is not in by its deadline: the blocked read returns at once (end of input), and the
request is answered `408` problem+json. The client cannot send on that connection again, so
gunicorn closes it after the answer.

Behind nginx (deploy/nginx.conf) a body reaches gunicorn only once nginx holds all of it, so
this deadline is never reached there.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
import threading
import time
from typing import Callable

import falcon

from .errors import Problem

log = logging.getLogger("records_service.http")


class Alarm:
    """One armed callback; `disarm` tells whether it already went off."""

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.disarmed = False
        self.fired = False


class Watchdog:
    """Calls each armed callback at its deadline (time.monotonic) unless it was disarmed first.

    One thread for every alarm of the process, started with the first one (after gunicorn has
    forked the worker): a thread per request would cost more than the request itself. It looks
    every `resolution_s`, so an alarm goes off up to that late; arming and disarming then only
    take a lock, never wake the thread.
    """

    def __init__(self, resolution_s: float = 0.1) -> None:
        self._resolution_s = resolution_s
        self._lock = threading.Lock()
        self._alarms: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, callback: Callable[[], None]) -> Alarm:
        alarm = Alarm(deadline, callback)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="body-deadline", daemon=True)
                self._thread.start()
            heapq.heappush(self._alarms, (deadline, next(self._order), alarm))
        return alarm

    def disarm(self, alarm: Alarm) -> bool:
        """Disarm `alarm`; True when it had already gone off."""
        with self._lock:
            alarm.disarmed = True
            return alarm.fired

    def _run(self) -> None:
        while True:
            time.sleep(self._resolution_s)
            now = time.monotonic()
            with self._lock:
                # Disarmed alarms leave when they reach the front: no search on every disarm.
                while self._alarms and (self._alarms[0][2].disarmed or self._alarms[0][0] <= now):
                    alarm = heapq.heappop(self._alarms)[2]
                    if alarm.disarmed:
                        continue
                    alarm.fired = True
                    try:
                        alarm.callback()
                    except Exception:  # the watchdog must outlive any one callback
                        log.exception("body deadline callback failed")


class BodyDeadline:
    """`with` around reading one request's body: past the deadline, 408 instead of the body.

    Without a socket to cut off (falcon.testing, another WSGI server), it only reads.
    """

    def __init__(self, watchdog: Watchdog, sock: socket.socket | None, deadline: float, timeout_s: float) -> None:
        self._watchdog = watchdog
        self._sock = sock
        self._deadline = deadline
        self._timeout_s = timeout_s
        self._alarm: Alarm | None = None

    def __enter__(self) -> "BodyDeadline":
        if self._sock is not None:
            self._alarm = self._watchdog.arm(self._deadline, self._cut_off)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._alarm is None or not self._watchdog.disarm(self._alarm):
            return False
        # Whatever the read did once its socket was cut off (a short body, or gunicorn's
        # error for a chunked body that ends early), the answer is that it came too late.
        log.info("request body not received in time", extra={"timeout_ms": round(self._timeout_s * 1000)})
        raise Problem(408, "request-timeout",
                      f"the body was not received within {self._timeout_s:g} s; the connection is closed") from None

    def _cut_off(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # the client is gone already


class BodyTimeout:
    """Middleware: every request gets a BodyDeadline (`req.context.body_deadline`) that ends
    `timeout_ms` after the request arrived; read_body reads the body inside it."""

    def __init__(self, timeout_ms: int) -> None:
        self._timeout_s = timeout_ms / 1000
        self._watchdog = Watchdog(resolution_s=min(0.1, self._timeout_s / 10))

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.body_deadline = BodyDeadline(self._watchdog, req.env.get("gunicorn.socket"),
                                                 time.monotonic() + self._timeout_s, self._timeout_s)
