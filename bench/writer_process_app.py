"""A prototype, for `bench_core.py --ours-app` only: POST /tests's write done by one writer
process of the host instead of by the request's own thread.

    .venv/bin/python bench/bench_core.py --scenarios POST --no-auth-compare --no-synchronous-compare \
        --ours-app 'writer_process_app:create_app()'

Under gunicorn a POST costs ~3x its in-process CPU: each sqlite3 call gives up the GIL, and the
thread holding the writers' turn waits for it while the worker's other threads run. Here a
request thread sends its validated record over a Unix socket to a single-threaded writer process
(forked by the first worker to take `<db>.writer-process`) and blocks in recv until the writer
answers after its commit. The writer takes every record waiting on its sockets, runs them in one
transaction, a savepoint each, commits, and answers each: no GIL to share, no turn to pass
between processes. What it leaves out (a prototype): the writers' slots, the deadline, the
error translation beyond duplicates, restarts of the writer. Never point it at a database that
matters.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import selectors
import socket
import sqlite3
import struct
import threading

from common import ROOT  # noqa: F401  (puts the repository on sys.path)
from records_service.app import create_app as _create_app
from records_service.config import load_settings
from records_service.store.base import prepare
from records_service.store.errors import DuplicateRecord, StoreUnavailable
from records_service.store.sqlite import SQLiteStore, records

__all__ = ["create_app"]

log = logging.getLogger("records_service.store")

_HEADER = struct.Struct("!I")


def _send(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv(sock: socket.socket):
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    return pickle.loads(_recv_exactly(sock, _HEADER.unpack(header)[0]))


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _serve(db_path: str, address: str, parent: int) -> None:
    store = SQLiteStore(db_path)
    store.open()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(512)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while os.getppid() == parent:
        pending = []
        for key, _ in sel.select(timeout=1.0):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                sel.register(conn, selectors.EVENT_READ)
                continue
            message = _recv(key.fileobj)
            if message is None:
                sel.unregister(key.fileobj)
                key.fileobj.close()
            else:
                pending.append((key.fileobj, message))
        if pending:
            _write_group(store, pending)


def _write_group(store: SQLiteStore, pending: list) -> None:
    try:
        answers, clinics = _run_group(store, pending)
    except Exception as exc:
        for sock, _ in pending:
            _send(sock, ("failed", type(exc).__name__))
        return
    for sock, answer in answers:
        _send(sock, answer)
    store._db._checkpoint_now_and_then(store._db.connection())
    store._wrote(clinics, sum(1 for _, (outcome, _) in answers if outcome == "stored"))


def _run_group(store: SQLiteStore, pending: list) -> tuple[list, set]:
    answers, clinics = [], set()
    with store._db.transaction() as conn:
        for sock, (record, request_id, key_id, now) in pending:
            row = prepare(record, request_id, now)
            conn.execute("SAVEPOINT write")
            try:
                clinics |= records.insert_rows(conn, [row], key_id)
                answers.append((sock, ("stored", row.doc)))
            except sqlite3.IntegrityError:
                conn.execute("ROLLBACK TO write")
                answers.append((sock, ("exists", records.stored(conn, record["test_id"]))))
            conn.execute("RELEASE write")
    return answers, clinics


def _start_writer(db_path: str, address: str) -> None:
    """Fork the writer once per host: the first worker to take the lock file does."""
    lock = os.open(db_path + ".writer-process", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return
    if os.path.exists(address):
        os.unlink(address)
    parent = os.getpid()
    if os.fork() == 0:
        try:
            _serve(db_path, address, parent)
        finally:
            os._exit(0)
    os.close(lock)  # the writer keeps the lock through its copy of the descriptor


class _Client(threading.local):
    sock: socket.socket | None = None


def create_app(*args, **kwargs):
    settings = load_settings(os.environ)
    address = settings.db_path + ".writer.sock"
    _start_writer(settings.db_path, address)
    client = _Client()

    def insert(self, record: dict, *, request_id: str, key_id: str | None = None, now: str) -> str:
        if client.sock is None:
            client.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            for _ in range(200):
                try:
                    client.sock.connect(address)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    threading.Event().wait(0.05)
        _send(client.sock, (record, request_id, key_id, now))
        outcome, doc = _recv(client.sock)
        if outcome == "exists":
            raise DuplicateRecord(doc)
        if outcome == "failed":
            raise StoreUnavailable(doc)
        log.info("committed", extra={"test_id": record["test_id"], "version": 1})
        return doc

    SQLiteStore.insert = insert
    return _create_app(*args, **kwargs)
