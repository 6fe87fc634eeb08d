"""SQLite connections, the writers' turn, checkpoints, and the one translation of sqlite3 errors.

Each thread of each process has its own connection (sqlite3 connections are not shared between
threads, and never carried across fork()): it is opened at the thread's first use and reopened
when the process id changes. Writers take turns on a file lock before `BEGIN IMMEDIATE`;
`Database.transaction` is the only place that begins, commits or rolls back a transaction (a
group of writes rolls back one of them to its savepoint: group_commit.py).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

from ..errors import StoreBusy, StoreCorrupt, StoreError, StoreFull, StoreReadOnly, StoreUnavailable
from .group_commit import GroupCommit
from .migrations import SCHEMA_VERSION, migrate

log = logging.getLogger("records_service.store")

T = TypeVar("T")

# Checkpoints (copying the WAL back into the database, with an fsync) are ours, not SQLite's:
# under steady load readers rarely let the WAL restart, SQLite's automatic checkpoint then runs
# after nearly every commit, and its fsync dominated a write. A process checkpoints after a
# commit once it has made CHECKPOINT_EVERY_COMMITS commits and CHECKPOINT_EVERY_S seconds passed.
CHECKPOINT_EVERY_COMMITS = 100
CHECKPOINT_EVERY_S = 1.0

# Writers take turns on a file lock (`<database>-writer`) before BEGIN IMMEDIATE. SQLite's own
# busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries, so under steady writes from several
# workers most of a write's time was spent asleep after the lock was already free (POST p99
# ~100-170 ms with the CPU a third idle). Trying the file lock every 50 us, backing off to 1 ms,
# hands the turn over almost at once; the deadline is still RECORDS_BUSY_TIMEOUT_MS.
WRITER_PAUSE_FIRST_S = 0.00005
WRITER_PAUSE_MAX_S = 0.001

# Reads through a memory map of the file instead of read() calls into each connection's cache:
# pages read 20-44% faster (bench/bench_layouts.py, 1,000,000 records). The mapped pages are the
# page cache every process shares, not a worker's own memory (tests measure anonymous memory).
MMAP_BYTES = 1 << 30

# Below this much free space on the database's file system, /ready says not ready: a small
# probe write can still land in WAL space already allocated while real writes fail.
MIN_FREE_BYTES = 1 << 20

_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_READ_ONLY = (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH)
_CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def translate(exc: sqlite3.Error, doing: str) -> StoreError:
    """The domain error for a sqlite3 error met while `doing` something: the one place that reads
    SQLite's result codes. The message keeps SQLite's own words for the log (never for a client)."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    detail = f"{doing}: {exc}"
    if code in _BUSY:
        return StoreBusy()
    if code == sqlite3.SQLITE_FULL:
        return StoreFull(detail)
    if code in _READ_ONLY:
        return StoreReadOnly(detail)
    if code in _CORRUPT:
        return StoreCorrupt(detail)
    return StoreUnavailable(detail)


class _ThreadState(threading.local):
    conn: sqlite3.Connection | None = None
    writer_lock: int | None = None  # this thread's descriptor of the writers' lock file
    pid: int | None = None
    file_id: tuple[int, int] | None = None


class Database:
    """One SQLite database file as this process sees it: a connection per thread, writes in turns."""

    def __init__(self, path: str, *, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000) -> None:
        # Resolved once: a relative path names a file in the working directory at start, and
        # resolving it later fails once that directory is gone (the error said so with a 500).
        self.path = os.path.abspath(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._synchronous = "FULL" if synchronous == "FULL" else "NORMAL"
        self._local = _ThreadState()
        self._all: list[_ThreadState] = []  # every thread's state, so close() reaches them all
        self._all_lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._commits_since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._checkpoint_to_finish = False  # see _checkpoint_now_and_then
        self._migrated = False
        self._group = GroupCommit(self.transaction, translate, busy_timeout_ms / 1000,
                                  after_commit=lambda: self._checkpoint_now_and_then(self._local.conn))

    # -- connections -----------------------------------------------------------------------

    def connection(self) -> sqlite3.Connection:
        state = self._local
        if state.conn is not None and state.pid == os.getpid() and _file_id(self.path) != state.file_id:
            # The file or its directory was removed (or swapped) under us: an open connection
            # would go on acknowledging writes into an unlinked file, so open the path afresh.
            log.warning("the database file is no longer at its path; reopening")
            self._close_thread(state)
        if state.conn is None or state.pid != os.getpid():
            state.conn = None  # a connection inherited across fork() is never used, nor closed
            state.writer_lock = self._open_writer_lock()
            try:
                state.conn = self._open()
            except BaseException:
                os.close(state.writer_lock)
                state.writer_lock = None
                raise
            state.pid = os.getpid()
            state.file_id = _file_id(self.path)
            with self._all_lock:
                self._all.append(state)
        return state.conn

    def _open(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; write() says BEGIN and COMMIT itself.
            # check_same_thread stays on: a connection belongs to the thread that opened it.
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout_ms / 1000)
        except sqlite3.Error as exc:
            raise translate(exc, f"cannot open the database {self.path}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                self._switch_to_wal(conn)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # see CHECKPOINT_EVERY_COMMITS
            conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
            if not self._migrated:
                migrate(conn)
                self._migrated = True
                log.info("database ready", extra={"schema_version": SCHEMA_VERSION})
        except sqlite3.Error as exc:
            conn.close()  # a half-prepared connection is retried from scratch at the next use
            raise translate(exc, f"cannot prepare the database {self.path}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _switch_to_wal(self, conn: sqlite3.Connection) -> None:
        """Switch a new file to WAL, taking a writer's turn for it.

        Workers starting at once on a new file all switch it, which needs an exclusive lock,
        and SQLite refuses the losers at once, without its busy handler (a deadlock guard: 58 of
        1,500 such connections failed in a test). A file already in WAL mode never gets here,
        so a worker starting while a write waits for the database starts and reads at once.
        """
        if not self._take_writer_turn(time.monotonic() + self.busy_timeout_ms / 1000):
            raise StoreBusy()
        try:
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise StoreUnavailable("the database could not be switched to WAL mode")
        finally:
            fcntl.flock(self._local.writer_lock, fcntl.LOCK_UN)

    def _open_writer_lock(self) -> int:
        lock_path = self.path + "-writer"
        try:
            try:
                return os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                if exc.errno not in (errno.EROFS, errno.EACCES):
                    raise
                # A database that cannot be written can still be read: flock needs no write access.
                return os.open(lock_path, os.O_RDONLY)
        except OSError as exc:
            directory = os.path.dirname(lock_path)
            if exc.errno == errno.ENOENT and not os.path.isdir(directory):
                raise StoreUnavailable(f"the database's directory {directory} does not exist (the database is"
                                       f" {self.path}): create it, or set RECORDS_DB_PATH to a file in a directory"
                                       " that exists") from exc
            error = StoreReadOnly if exc.errno == errno.EROFS else StoreUnavailable
            raise error(f"cannot open the writers' lock file {lock_path}: {exc.strerror}") from exc

    def close(self) -> None:
        """Close every connection this process opened, in every thread (at shutdown; tests)."""
        with self._all_lock:
            states, self._all = self._all, []
        for state in states:
            self._close_thread(state)

    def _close_thread(self, state: _ThreadState) -> None:
        if state.conn is not None and state.pid == os.getpid():
            try:
                state.conn.close()
            except sqlite3.ProgrammingError:
                pass  # another thread's connection, at shutdown: the process is ending anyway
            os.close(state.writer_lock)
        state.conn = None
        state.writer_lock = None

    # -- reads -----------------------------------------------------------------------------

    def read(self, sql: str, params: Iterable = ()) -> list[tuple]:
        try:
            return self.connection().execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise translate(exc, "read failed") from exc

    def cursor(self, sql: str, params: Iterable = ()) -> sqlite3.Cursor:
        """A cursor whose rows are fetched as they are read (`fetch_many` translates its errors)."""
        try:
            return self.connection().execute(sql, tuple(params))
        except sqlite3.Error as exc:
            raise translate(exc, "read failed") from exc

    def snapshot(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work`'s reads in one read transaction: they all see the database as of one commit."""
        conn = self.connection()
        try:
            conn.execute("BEGIN")
            try:
                return work(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise translate(exc, "read failed") from exc

    # -- writes ----------------------------------------------------------------------------

    def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in a BEGIN IMMEDIATE transaction (see `transaction`), committed together with
        the writes other threads of this process asked for meanwhile (group_commit.py); now and
        then a checkpoint follows, once the writes' threads have their results."""
        return self._group.write(work)

    @contextmanager
    def transaction(self, *, load: bool = False, deadline: float | None = None) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction in the writers' turn; the only place that begins or commits.

        A sqlite3 error inside becomes a domain error; anything raised on purpose (a duplicate,
        a version mismatch) rolls back and passes through unchanged. A generator may hold it
        across its yields (a bulk load): closing the generator early rolls back.

        With `load` (a bulk load into an empty database), when no other connection has the
        file open, the transaction runs with a rollback journal instead of the WAL: each new page
        is written once, into the database (in WAL mode, into the WAL and then again by the
        checkpoint), and the journal holds only the few pages that existed before. A crash
        midway leaves that journal: the next connection rolls the load back and switches the file
        to WAL again, as for a new file. Otherwise (a server has it open) it stays in WAL mode.

        `deadline` (time.monotonic()) bounds the wait for the turn; by default the busy timeout
        from now (a group of writes passes its first write's).
        """
        conn = self.connection()
        lock = self._local.writer_lock
        if deadline is None:
            deadline = time.monotonic() + self.busy_timeout_ms / 1000
        if not self._take_writer_turn(deadline):
            log.warning("another writer held the database past %d ms; write refused", self.busy_timeout_ms)
            raise StoreBusy()
        try:
            left_wal = load and _leave_wal(conn, self.busy_timeout_ms)
            try:
                self._begin_immediate(conn, deadline)
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException as exc:
                    self._roll_back(conn, exc)
                    if isinstance(exc, sqlite3.Error):
                        raise translate(exc, "write failed") from exc
                    raise
            finally:
                if left_wal:
                    _back_to_wal(conn)
            if self._checkpoint_to_finish:
                self._checkpoint_to_finish = False
                _checkpoint(conn)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _roll_back(conn: sqlite3.Connection, cause: BaseException) -> None:
        """Roll back what is left of the transaction. SQLite rolls back by itself on some errors
        (a full disk during COMMIT): ROLLBACK then fails with "no transaction is active", which
        must not hide the cause."""
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("rollback failed after %s: %s", type(cause).__name__, exc)
        if isinstance(cause, sqlite3.Error):
            log.error("transaction rolled back: %s", cause)
        else:
            log.info("transaction rolled back")

    def _begin_immediate(self, conn: sqlite3.Connection, deadline: float) -> None:
        """BEGIN IMMEDIATE, which waits only for a writer outside the service (a shell, a script),
        and no longer than what is left of the bound once the turn was taken (StoreBusy after)."""
        left_ms = round((deadline - time.monotonic()) * 1000)
        shortened = left_ms < self.busy_timeout_ms - 1  # the turn took a while: wait less
        try:
            if shortened:
                conn.execute(f"PRAGMA busy_timeout = {max(left_ms, 0)}")
            try:
                conn.execute("BEGIN IMMEDIATE")
            finally:
                if shortened:
                    conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        except sqlite3.Error as exc:
            error = translate(exc, "cannot begin a write")
            if isinstance(error, StoreBusy):
                log.warning("database busy past %d ms; write refused", self.busy_timeout_ms)
            raise error from exc

    def _take_writer_turn(self, deadline: float) -> bool:
        """Take the writers' file lock, trying often (see WRITER_PAUSE_FIRST_S); False at the deadline."""
        lock = self._local.writer_lock
        pause = WRITER_PAUSE_FIRST_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                now = time.monotonic()
                if now >= deadline:
                    return False
                time.sleep(min(pause, deadline - now))
                pause = min(pause * 2, WRITER_PAUSE_MAX_S)

    def _checkpoint_now_and_then(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL into the database once enough commits and time have passed, in two steps.

        The bulk of the copy, and its fsync, runs after a group of writes was committed and
        answered, with the turn given back, while other writers carry on (inside the turn, ~100
        ms under load, it stalled every writer: POST p99 ~110 ms). Writers append meanwhile, so
        the WAL could never start over: this process's next write, still inside its turn,
        copies just what they appended, and the writer after it can restart the WAL.
        """
        with self._checkpoint_lock:
            self._commits_since_checkpoint += 1
            now = time.monotonic()
            if (self._commits_since_checkpoint < CHECKPOINT_EVERY_COMMITS
                    or now - self._last_checkpoint < CHECKPOINT_EVERY_S):
                return
            self._commits_since_checkpoint = 0
            self._last_checkpoint = now
        _checkpoint(conn)
        self._checkpoint_to_finish = True

    def free_bytes(self) -> int:
        """Free space on the file system holding the database, for a non-root writer."""
        directory = os.path.dirname(self.path)
        try:
            stat = os.statvfs(directory)
        except OSError as exc:
            raise StoreUnavailable(f"cannot read the free space of {directory}: {exc.strerror}") from exc
        return stat.f_bavail * stat.f_frsize


def _leave_wal(conn: sqlite3.Connection, busy_timeout_ms: int) -> bool:
    """Switch to a rollback journal if no other connection has the file open (SQLite refuses at
    once otherwise: it is never waited for). True when switched."""
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        return conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0].lower() == "delete"
    except sqlite3.Error:
        return False  # busy: another connection has it open (anything else, BEGIN meets it next)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")


def _back_to_wal(conn: sqlite3.Connection) -> None:
    """Back to WAL after a load; if another connection opened the file meanwhile (it waits for
    the writers' turn to switch it itself), it switches it."""
    try:
        conn.execute("PRAGMA journal_mode = WAL")
    except sqlite3.Error as exc:
        log.warning("the database stays in rollback-journal mode until the next connection opens it: %s", exc)


def _checkpoint(conn: sqlite3.Connection) -> None:
    """PASSIVE: copies what no reader still needs and never waits; what it leaves is the next
    one's work. A failure is logged, never raised: the write before it is committed."""
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error as exc:
        log.warning("checkpoint failed: %s", exc)


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
