"""Writes from a process's threads committed together (store/sqlite/group_commit.py): each write
gets its own result or error, a write that fails alone rolls back alone, a transaction that fails
fails every write in it, and each write runs with its own request's context."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from records_service.logs import request_id_var
from records_service.store import DuplicateRecord, StoreUnavailable
from records_service.store.sqlite.connection import Database


@pytest.fixture
def db(tmp_path):
    database = Database(str(tmp_path / "r.db"))
    database.write(lambda conn: conn.execute("CREATE TABLE notes (name TEXT PRIMARY KEY)"))
    yield database
    database.close()


def names(db: Database) -> set[str]:
    return {name for (name,) in db.read("SELECT name FROM notes")}


def add(name: str):
    def work(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO notes (name) VALUES (?)", (name,))
        return threading.get_ident()
    return work


def writes_while_one_is_held(db: Database, works: list, pool: ThreadPoolExecutor) -> tuple[Future, list[Future]]:
    """Start a write that waits inside its transaction until `works` are all queued behind it,
    then let it finish: the queued writes are one group, led by one thread."""
    return calls_while_one_is_held(db, [lambda work=work: db.write(work) for work in works], pool)


def calls_while_one_is_held(db: Database, calls: list, pool: ThreadPoolExecutor) -> tuple[Future, list[Future]]:
    """The same, for `calls` that each make one write."""
    held, release = threading.Event(), threading.Event()

    def first(conn: sqlite3.Connection) -> int:
        held.set()
        release.wait(10)
        return add("first")(conn)

    leader = pool.submit(db.write, first)
    assert held.wait(10)
    queued = [pool.submit(call) for call in calls]
    deadline = time.monotonic() + 10
    while len(db._group._waiting) < len(calls) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(db._group._waiting) == len(calls), "the writes did not queue behind the held one"
    release.set()
    return leader, queued


def test_writes_queued_behind_a_transaction_commit_together_each_with_its_own_result(db):
    with ThreadPoolExecutor(12) as pool:
        leader, queued = writes_while_one_is_held(db, [add(f"n{i}") for i in range(10)], pool)
        threads = {future.result(10) for future in queued}
        leader.result(10)
    assert names(db) == {"first"} | {f"n{i}" for i in range(10)}
    assert len(threads) == 1, "the ten queued writes ran in more than one group"


def test_a_write_that_fails_on_its_own_rolls_back_alone(db):
    def duplicate_after_writing(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO notes (name) VALUES ('half-done')")
        raise DuplicateRecord({"test_id": "t"})

    def breaks_a_constraint(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO notes (name) VALUES ('also-half-done')")
        conn.execute("INSERT INTO notes (name) VALUES ('a')")  # 'a' is taken: sqlite3.IntegrityError

    with ThreadPoolExecutor(6) as pool:
        leader, queued = writes_while_one_is_held(
            db, [add("a"), duplicate_after_writing, breaks_a_constraint, add("b")], pool)
        a, duplicate, constraint, b = queued
        a.result(10), b.result(10), leader.result(10)
        with pytest.raises(DuplicateRecord):
            duplicate.result(10)
        with pytest.raises(StoreUnavailable):  # a sqlite3 error becomes a domain error
            constraint.result(10)
    assert names(db) == {"first", "a", "b"}


def test_when_the_transaction_fails_no_write_in_it_is_reported_committed(db):
    def transaction_lost(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")  # what SQLite does by itself on a full disk or an I/O error
        raise sqlite3.OperationalError("database or disk is full")

    with ThreadPoolExecutor(6) as pool:
        leader, queued = writes_while_one_is_held(db, [add("a"), transaction_lost, add("b")], pool)
        leader.result(10)  # the held write was a group of its own, committed before
        for future in queued:
            with pytest.raises(StoreUnavailable):
                future.result(10)
    assert names(db) == {"first"}
    assert db.write(add("after")) and "after" in names(db), "writes did not go on after a failed group"


def test_each_write_runs_with_its_own_requests_context(db):
    def request(request_id: str) -> tuple[str, int]:
        request_id_var.set(request_id)
        return db.write(lambda conn: (request_id_var.get(), threading.get_ident()))

    with ThreadPoolExecutor(12) as pool:
        leader, queued = calls_while_one_is_held(db, [lambda i=i: request(f"req-{i}") for i in range(10)], pool)
        seen = [future.result(10) for future in queued]
        leader.result(10)
    assert [request_id for request_id, _ in seen] == [f"req-{i}" for i in range(10)]
    assert len({thread for _, thread in seen}) == 1, "not one group: the test proves nothing"


def test_a_failed_group_says_so_under_each_of_its_requests_ids(db, log_lines):
    def request(request_id: str, work):
        request_id_var.set(request_id)
        return db.write(work)

    def transaction_lost(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("disk I/O error")

    works = {"req-a": add("a"), "req-lost": transaction_lost, "req-b": add("b")}
    with ThreadPoolExecutor(6) as pool:
        leader, queued = calls_while_one_is_held(
            db, [lambda rid=rid, work=work: request(rid, work) for rid, work in works.items()], pool)
        leader.result(10)
        for future in queued:
            with pytest.raises(StoreUnavailable):
                future.result(10)
    failed = [line for line in log_lines if line["message"] == "group of writes not committed"]
    assert sorted(line.get("request_id") for line in failed) == sorted(works)
    assert all((line["writes"], line["failed"]) == (3, 3) for line in failed)
