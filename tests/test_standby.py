"""A primary with a synchronous streaming standby: the service, given a URL naming both hosts
with `target_session_attrs=read-write`, follows the standby once it is promoted, without a
restart, and loses no acknowledged write (API.md, "Storage")."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.live import PostgresCluster, RetryingWriters, admin
from tests.test_gunicorn import make_record

MAX_ANSWER_S = 10  # a write answers within the busy bound (5 s) and a connect timeout: never a hang


@pytest.fixture
def primary_and_standby():
    primary = PostgresCluster().start()
    standby = None
    try:
        standby = primary.add_standby()
        yield primary, standby
    finally:
        for cluster in (primary, standby):
            if cluster is not None:
                cluster.destroy()


def both_hosts(url: str, primary: PostgresCluster, standby: PostgresCluster) -> str:
    """`url` (one of the primary's databases) naming both servers, for libpq to find the writable one."""
    one, both = f"@127.0.0.1:{primary.port}/", f"@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/"
    assert one in url
    return url.replace(one, both) + "&target_session_attrs=read-write"


def test_a_promoted_standby_takes_the_writes_without_a_restart_and_holds_every_acknowledged_one(
        start_server, primary_and_standby):
    primary, standby = primary_and_standby
    own_url = primary.new_database()
    server = start_server(workers=2, RECORDS_DATABASE_URL=both_hosts(own_url, primary, standby))
    workers = sorted(server.worker_pids())

    with RetryingWriters(server.port, make_record, prefix="sb", threads=8, pause_s=0.05) as writers:
        writers.wait_for(200)
        os.kill(primary.postmaster_pid(), signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + MAX_ANSWER_S
        while not any(a.status == 503 and a.started >= killed for a in writers.all_answers()):
            assert time.monotonic() < deadline, "no write was refused after the primary died"
            time.sleep(0.01)
        promote_started = time.monotonic()
        standby.promote()
        promoted = time.monotonic()
        writers.wait_for(200, since=promoted)
    answers = writers.all_answers()

    assert {a.status for a in answers} <= {201, 503, 409}, sorted({a.status for a in answers}, key=str)
    refused = [a for a in answers if a.status == 503]
    assert refused and all(a.retry_after and int(a.retry_after) >= 1 for a in refused)
    assert max(a.ended - a.started for a in answers) < MAX_ANSWER_S
    unresolved = {test_id: [a.status for a in got] for test_id, got in writers.answers.items()
                  if not (got[-1].status == 201 or (got[-1].status == 409 and got[-1].identical))}
    assert unresolved == {}, "retries that did not end in 201 or 409 identical: true"

    # The same gunicorn, the same workers: nothing was restarted to reach the new primary.
    assert server.proc.poll() is None and sorted(server.worker_pids()) == workers
    assert '"status": 500' not in server.output()

    on_standby = own_url.replace(f"@127.0.0.1:{primary.port}/", f"@127.0.0.1:{standby.port}/")
    on_new_primary = {row[0] for row in admin(on_standby, "SELECT test_id FROM records")}
    lost = [test_id for test_id in writers.acknowledged() if test_id not in on_new_primary]
    assert lost == [], f"{len(lost)} acknowledged records are not on the new primary"

    first_refused = min(a.ended for a in refused)
    first_201 = min(a.ended for a in answers if a.status == 201 and a.ended > promoted)
    print(f"\nswitch: {first_201 - first_refused:.2f}s from the first refused write to the first 201 "
          f"(promote {promoted - promote_started:.2f}s); {len(refused)} answers 503, "
          f"{len(writers.acknowledged())} records acknowledged")
