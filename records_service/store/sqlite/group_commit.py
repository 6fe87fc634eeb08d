"""Writes from a process's threads committed together: one transaction, one turn, one commit.

SQLite takes one writer at a time, and each transaction pays for the writers' turn, BEGIN
IMMEDIATE and COMMIT (the WAL frames of every page it touched, and the locks around them).
When each request's write was its own transaction, the thread holding the turn also waited for
the GIL after every sqlite3 call while the process's other threads ran, and the turn passed
from thread to thread once per record: a POST cost ~3 ms of CPU under gunicorn against ~0.5 ms
in one thread (bench/bench_core.py; bench/bench_group_commit.py measures both ways).

Here the first thread to write becomes the leader: it takes every write waiting in the process
at that moment, runs each in a savepoint of one transaction, commits, and hands each waiting
thread its own result or error. A write that fails on purpose (a duplicate) rolls back only its
savepoint; when the transaction itself fails (the disk is full, the commit fails), every write
in it fails, and none is reported committed. The threads that wrote while the leader worked form
the next group, led by the first of them.
"""

from __future__ import annotations

import contextvars
import logging
import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from typing import Callable, Generic, TypeVar

log = logging.getLogger("records_service.store")

T = TypeVar("T")


class _Write(Generic[T]):
    __slots__ = ("work", "deadline", "context", "wake", "leads", "result", "error")

    def __init__(self, work: Callable[[sqlite3.Connection], T], deadline: float) -> None:
        self.work = work
        self.deadline = deadline
        self.context = contextvars.copy_context()  # its request's ID goes on any line it logs
        self.wake = threading.Event()
        self.leads = False
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self, conn: sqlite3.Connection) -> None:
        self.result = self.context.run(self.work, conn)

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommit:
    """The waiting writes of one process. `transaction(deadline=...)` opens the one write
    transaction a group runs in; the group's deadline is its first write's: no write waits for
    its turn longer than `wait_s`, as when each took the turn alone. `after_commit` runs in the
    leader's thread once the group's threads have their results (a checkpoint, now and then)."""

    def __init__(self, transaction: Callable[..., AbstractContextManager[sqlite3.Connection]],
                 translate: Callable[[sqlite3.Error, str], Exception], wait_s: float,
                 after_commit: Callable[[], None]) -> None:
        self._transaction = transaction
        self._wait_s = wait_s
        self._after_commit = after_commit
        self._translate = translate
        self._lock = threading.Lock()
        self._waiting: list[_Write] = []
        self._led = False  # a leader is running a group

    def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        write = _Write(work, time.monotonic() + self._wait_s)
        with self._lock:
            self._waiting.append(write)
            if not self._led:
                self._led = write.leads = True
        if not write.leads:
            write.wake.wait()
        if write.leads:
            self._lead()
        return write.outcome()

    def _lead(self) -> None:
        with self._lock:
            group, self._waiting = self._waiting, []
        committed = False
        try:
            committed = self._run(group)
        finally:
            with self._lock:
                if self._waiting:
                    self._waiting[0].leads = True
                    self._waiting[0].wake.set()
                else:
                    self._led = False
            for write in group:
                write.wake.set()
        if committed:
            self._after_commit()

    def _run(self, group: list[_Write]) -> bool:
        """Run the group in one transaction; True when it committed."""
        try:
            with self._transaction(deadline=group[0].deadline) as conn:
                if len(group) == 1:
                    group[0].run(conn)
                else:
                    for write in group:
                        self._run_in_savepoint(write, conn)
            return True
        except BaseException as exc:
            failed = [write for write in group if write.error is None]
            for write in failed:
                write.error = exc
            if len(group) > 1:  # a line under each request's ID: every one of them can be followed
                for write in group:
                    write.context.run(log.warning, "group of writes not committed",
                                      extra={"writes": len(group), "failed": len(failed)})
            if not isinstance(exc, Exception):
                raise
            return False

    def _run_in_savepoint(self, write: _Write, conn: sqlite3.Connection) -> None:
        conn.execute("SAVEPOINT write")
        try:
            write.run(conn)
        except Exception as exc:
            if not conn.in_transaction:
                raise  # SQLite rolled the whole transaction back (a full disk): every write fails
            conn.execute("ROLLBACK TO write")
            write.error = self._translate(exc, "write failed") if isinstance(exc, sqlite3.Error) else exc
        conn.execute("RELEASE write")
