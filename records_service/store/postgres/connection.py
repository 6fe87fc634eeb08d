"""PostgreSQL connections, the busy bound, and the one translation of psycopg errors.

Each thread of each process has its own connection, as with SQLite: opened at the thread's
first use, reopened when the process id changes (never carried across fork()) and when the
last one broke (a killed backend, a restarted server), so service resumes by itself. No pool
(psycopg_pool): every request a gthread worker serves at once needs a connection anyway, so a
pool would hold as many; opening one cost ~10 ms against ~0.3 ms a query on an open one
(measured on the test machine), paid once per thread, never per request.

`Database.write` and `Database.snapshot` are the only places that begin and commit. Every
statement's lock waits and run time are bounded by RECORDS_BUSY_TIMEOUT_MS (lock_timeout and
statement_timeout, set for the connection), so a request waits no longer than on SQLite.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Mapping, Sequence, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from ...config import redact_url
from ..errors import StoreBusy, StoreCorrupt, StoreError, StoreFull, StoreReadOnly, StoreUnavailable

log = logging.getLogger("records_service.store")

T = TypeVar("T")

_UNBOUNDED = "; SET LOCAL statement_timeout = 0"

# libpq's connect_timeout is whole seconds, at least 2: an unreachable host is refused in that time.
MIN_CONNECT_TIMEOUT_S = 2

_BUSY = (pg_errors.LockNotAvailable, pg_errors.QueryCanceled, pg_errors.DeadlockDetected,
         pg_errors.SerializationFailure)
_FULL = (pg_errors.DiskFull, pg_errors.OutOfMemory, pg_errors.ProgramLimitExceeded)
_CORRUPT = (pg_errors.DataCorrupted, pg_errors.IndexCorrupted)


def translate(exc: psycopg.Error, doing: str) -> StoreError:
    """The domain error for a psycopg error met while `doing` something: the one place that reads
    PostgreSQL's error classes. The message keeps the server's words for the log, never a client."""
    detail = f"{doing}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if isinstance(exc, _BUSY):
        return StoreBusy()
    if isinstance(exc, pg_errors.DiskFull):
        return StoreFull(detail)
    if isinstance(exc, _FULL):
        return StoreUnavailable(detail)
    if isinstance(exc, pg_errors.ReadOnlySqlTransaction):
        return StoreReadOnly(detail)
    if isinstance(exc, _CORRUPT):
        return StoreCorrupt(detail)
    return StoreUnavailable(detail)


class _ThreadState(threading.local):
    conn: psycopg.Connection | None = None
    pid: int | None = None


class Database:
    """One PostgreSQL database as this process sees it: a connection per thread, bounded waits."""

    def __init__(self, url: str, *, busy_timeout_ms: int = 5000, on_connect: Callable[[psycopg.Connection], None]
                 | None = None) -> None:
        self.url = url
        self.busy_timeout_ms = busy_timeout_ms
        self._on_connect = on_connect  # runs once per process on its first connection (migrate)
        self._prepared_pid: int | None = None
        self._local = _ThreadState()
        self._all: list[_ThreadState] = []
        self._all_lock = threading.Lock()

    # -- connections -----------------------------------------------------------------------

    def connection(self) -> psycopg.Connection:
        state = self._local
        if state.conn is not None and state.pid == os.getpid() and state.conn.closed:
            state.conn = None  # broken at its last use: open a new one
        if state.conn is None or state.pid != os.getpid():
            state.conn = None  # a connection inherited across fork() is never used, nor closed
            state.conn = self._open()
            state.pid = os.getpid()
            with self._all_lock:
                self._all.append(state)
        elif state.conn.info.transaction_status != TransactionStatus.IDLE:
            # A transaction left open (an export abandoned before its first chunk was read): end it.
            self._roll_back(state.conn)
        return state.conn

    def _open(self) -> psycopg.Connection:
        timeout_s = max(MIN_CONNECT_TIMEOUT_S, -(-self.busy_timeout_ms // 1000))
        try:
            options = " ".join(filter(None, [conninfo_to_dict(self.url).get("options"), self._bounds()]))
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=timeout_s,
                                   application_name="records_service", options=options)
        except psycopg.Error as exc:
            raise translate(exc, f"cannot connect to {redact_url(self.url)}") from exc
        try:
            if self._on_connect is not None and self._prepared_pid != os.getpid():
                self._on_connect(conn)
                self._prepared_pid = os.getpid()
        except psycopg.Error as exc:
            conn.close()
            raise translate(exc, f"cannot prepare the database {redact_url(self.url)}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _bounds(self) -> str:
        """Every statement of this connection waits for locks, and runs, at most the busy bound."""
        ms = int(self.busy_timeout_ms)
        return f"-c lock_timeout={ms} -c statement_timeout={ms}"

    def close(self) -> None:
        """Close every connection this process opened, in every thread (at shutdown; tests)."""
        with self._all_lock:
            states, self._all = self._all, []
        for state in states:
            if state.conn is not None and state.pid == os.getpid():
                state.conn.close()
            state.conn = None

    def drop_if_broken(self) -> bool:
        """Drop this thread's connection when an error broke it (the next use reconnects); whether it did."""
        conn = self._local.conn
        if conn is not None and (conn.closed or conn.broken):
            conn.close()
            self._local.conn = None
            return True
        return False

    @staticmethod
    def _roll_back(conn: psycopg.Connection) -> None:
        try:
            conn.rollback()
        except psycopg.Error as exc:
            log.warning("rollback failed: %s", exc)
            conn.close()

    # -- transactions ----------------------------------------------------------------------

    def write(self, work: Callable[[psycopg.Connection], T], *, unbounded: bool = False) -> T:
        """Run `work` in one transaction; the only place that begins or commits a write.

        A psycopg error inside becomes a domain error; anything `work` raises on purpose (a
        duplicate, a version mismatch) rolls back and passes through unchanged. `unbounded`
        lifts the statement bound for this transaction (seed, copy: long by nature).
        """
        return self._run(work, "write failed", "BEGIN" + _UNBOUNDED * unbounded, read_only=False)

    def snapshot(self, work: Callable[[psycopg.Connection], T], *, unbounded: bool = False) -> T:
        """Run `work`'s reads in one REPEATABLE READ transaction: they all see one commit."""
        return self._run(work, "read failed", "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" + _UNBOUNDED * unbounded)

    def read(self, sql: str, params: Sequence | Mapping = ()) -> list[tuple]:
        """One statement on its own (autocommit), bounded like every other."""
        return self._run(lambda conn: conn.execute(sql, params).fetchall(), "read failed", None)

    def _run(self, work: Callable[[psycopg.Connection], T], doing: str, begin: str | None, *,
             read_only: bool = True) -> T:
        """`work` on this thread's connection, inside `begin` ... COMMIT when `begin` is given.

        A connection found broken (the server restarted, or the backend was killed, since its
        last use) is replaced and the work tried once more at once when that is safe: a read,
        or a write whose BEGIN never got through. Any other failure is translated.
        """
        for attempt in (1, 2):
            conn = self.connection()
            began = False
            try:
                if begin:
                    conn.execute(begin)
                    began = True
                result = work(conn)
                if begin:
                    conn.execute("COMMIT")
                return result
            except BaseException as exc:
                if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                    self._roll_back(conn)
                if not isinstance(exc, psycopg.Error):
                    if begin:
                        log.info("transaction rolled back")
                    raise
                if self.drop_if_broken() and attempt == 1 and (read_only or not began):
                    log.info("the database connection was lost since its last use; reconnecting")
                    continue
                error = translate(exc, doing)
                if isinstance(error, StoreBusy):
                    log.warning("database busy past %d ms; refused", self.busy_timeout_ms)
                else:
                    log.error("transaction rolled back: %s" if begin else "read failed: %s", error)
                raise error from exc
        raise AssertionError("unreachable")
