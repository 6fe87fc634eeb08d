"""Claims about the record lifecycle in real gunicorn processes: concurrent corrections, and
following one write from the logs to the database and back."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from tests.live import REPO, writes_held
from tests.test_gunicorn import make_record, wait_for_log


@pytest.mark.both_engines
def test_of_clients_correcting_the_same_version_at_once_exactly_one_wins(start_server):
    clients = 4
    server = start_server(workers=clients, RECORDS_LOG_LEVEL="DEBUG")
    created = server.request("POST", "/tests", make_record("race-1"))
    assert created.status == 201

    # Hold the write lock until every correction is in a worker, so they all read version 1
    # and meet at the write; then let go.
    answers: dict[str, object] = {}

    def correct(n: int) -> None:
        answers[f"race-{n}"] = server.request(
            "PUT", "/tests/race-1", make_record("race-1", result=float(n), status="corrected"),
            {"If-Match": '"1"', "X-Request-ID": f"race-{n}"})

    threads = [threading.Thread(target=correct, args=(n,)) for n in range(clients)]
    with writes_held(server):
        for t in threads:
            t.start()
        for n in range(clients):
            wait_for_log(server, lambda l, n=n: l.get("request_id") == f"race-{n}" and l["message"] == "request received")
    for t in threads:
        t.join(30)

    statuses = sorted(resp.status for resp in answers.values())
    assert statuses == [200] + [412] * (clients - 1), statuses
    (winner_id, winner), = [(rid, resp) for rid, resp in answers.items() if resp.status == 200]
    assert winner.json()["request_id"] == winner_id and winner.headers["etag"] == '"2"'
    history = server.request("GET", "/tests/race-1/history").json()
    assert history == [created.json(), winner.json()]
    assert server.request("GET", "/tests/race-1").json() == winner.json()


@pytest.mark.both_engines
def test_a_write_is_followed_from_the_logs_to_the_database_and_back(start_server):
    server = start_server(workers=2)
    # No X-Request-ID: the service makes the IDs, as for most clients.
    assert server.request("POST", "/tests", make_record("traced-1")).status == 201
    corrected = server.request("PUT", "/tests/traced-1", make_record("traced-1", result=8.1, status="corrected"),
                               {"If-Match": '"1"'})
    assert corrected.status == 200

    # Logs -> database: the request that committed version 2, as the log tells it ...
    committed = wait_for_log(server, lambda l: l["message"] == "committed" and l.get("test_id") == "traced-1"
                             and l.get("version") == 2)
    request_id = committed["request_id"]
    assert committed["action"] == "correct"
    # ... wrote exactly this, and the record says so.
    audit = server.request("GET", f"/audit/{request_id}")
    assert audit.status == 200
    assert audit.json() == [{"test_id": "traced-1", "version": 2, "action": "correct",
                             "at": corrected.json()["updated_at"], "clinic_id": "C001", "key_id": None}]
    assert corrected.json()["request_id"] == request_id

    # Database -> logs: the record's first version names the request that created it ...
    created_by = server.request("GET", "/tests/traced-1/history").json()[0]["request_id"]
    assert created_by != request_id
    story = [line for line in server.log_lines() if line.get("request_id") == created_by]
    assert [line["message"] for line in story] == ["committed", "request completed"]
    assert (story[0]["test_id"], story[0]["version"]) == ("traced-1", 1)
    assert (story[-1]["method"], story[-1]["path"], story[-1]["status"]) == ("POST", "/tests", 201)

    # ... and the auditor's tool tells the same story from the log file, non-JSON lines and all.
    with open(server.log_path, "a") as log:
        log.write(f"a line that is not JSON, mentioning {created_by}\n")
    trace = subprocess.run([sys.executable, "-m", "records_service", "trace", created_by, str(server.log_path)],
                           cwd=REPO, capture_output=True, text=True, timeout=30)
    assert trace.returncode == 0, trace.stderr
    lines = trace.stdout.splitlines()
    assert lines[0].startswith(f"request {created_by}: 2 log lines")
    assert "committed" in lines[1] and "test_id=traced-1 version=1" in lines[1]
    assert "request completed" in lines[2] and "method=POST path=/tests status=201" in lines[2]
