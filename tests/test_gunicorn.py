"""Claims about real processes: gunicorn with several workers on loopback, spoken to over HTTP."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.live import RawDatabase, Writers, request, writes_held


def make_record(test_id: str, clinic_id: str = "C001", **extra) -> dict:
    return {"test_id": test_id, "clinic_id": clinic_id, "patient_id": "P1", "test_type": "CBC",
            "result": 7.2, "collected_at": "2025-05-01T10:00:00Z", **extra}


def clinic_ids(server, clinic_id: str) -> list[str]:
    """Every test_id of the clinic, following the pages' next links."""
    return [r["test_id"] for r in server.walk(f"/tests?clinic_id={clinic_id}")]


def wait_for_log(server, predicate, deadline_s: float = 10) -> dict:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for line in server.log_lines():
            if predicate(line):
                return line
        time.sleep(0.02)
    raise AssertionError(f"no such log line within {deadline_s}s:\n{server.output()}")


@pytest.mark.both_engines
def test_32_concurrent_writers_get_only_201s_and_every_record_is_stored_once(start_server):
    server = start_server(workers=4)
    clinics = [f"C{n}" for n in range(4)]

    def write(client_no: int) -> list[tuple[str, int]]:
        outcomes = []
        for i in range(15):
            test_id = f"w{client_no}-{i}"
            resp = server.request("POST", "/tests", make_record(test_id, clinics[client_no % 4]))
            outcomes.append((test_id, resp.status))
            if resp.status != 201:
                refusals.append(resp.body[:300])
        return outcomes

    refusals = []
    with ThreadPoolExecutor(max_workers=32) as pool:
        outcomes = [o for batch in pool.map(write, range(32)) for o in batch]

    assert {status for _, status in outcomes} == {201}, refusals
    stored = [test_id for clinic in clinics for test_id in clinic_ids(server, clinic)]
    assert sorted(stored) == sorted(test_id for test_id, _ in outcomes)
    assert len(stored) == 32 * 15
    assert "database is locked" not in server.output()


@pytest.mark.both_engines
def test_an_acknowledged_record_survives_kill_9_of_the_whole_process_group(start_server, tmp_path):
    server = start_server(workers=3)
    with Writers(server, make_record, prefix="k") as writers:
        writers.wait_for(200)
        server.kill()  # SIGKILL to master and workers while writes are in flight
    acknowledged = writers.acknowledged

    restarted = start_server(workers=2, db_path=server.db_path)
    stored = set(clinic_ids(restarted, "C001"))
    missing = [test_id for test_id in acknowledged if test_id not in stored]
    assert missing == [], f"{len(missing)} acknowledged records lost"


@pytest.mark.both_engines
def test_sigterm_lets_an_in_flight_request_finish(start_server):
    server = start_server(workers=1, RECORDS_LOG_LEVEL="DEBUG", RECORDS_BUSY_TIMEOUT_MS=20000)
    result = {}
    with writes_held(server):  # the POST below waits for this lock: it is in flight until we let go
        poster = threading.Thread(target=lambda: result.update(
            resp=server.request("POST", "/tests", make_record("in-flight"), {"X-Request-ID": "inflight-1"})))
        poster.start()
        wait_for_log(server, lambda l: l.get("request_id") == "inflight-1" and l["message"] == "request received")

        server.proc.send_signal(signal.SIGTERM)
        wait_for_log(server, lambda l: "Handling signal: term" in l["message"])
    poster.join(30)

    assert result["resp"].status == 201
    assert server.proc.wait(30) == 0
    db = RawDatabase(str(server.db_path), server.database_url)
    assert db.execute("SELECT test_id FROM records") == [("in-flight",)]
    db.close()


@pytest.mark.both_engines
def test_a_database_locked_past_the_bound_answers_503_with_retry_after_while_reads_go_on(start_server):
    bound = 0.6
    server = start_server(workers=3, RECORDS_BUSY_TIMEOUT_MS=int(bound * 1000))
    assert server.request("POST", "/tests", make_record("before")).status == 201

    def timed_post(test_id: str):
        started = time.monotonic()
        resp = server.request("POST", "/tests", make_record(test_id))
        return resp, time.monotonic() - started

    with writes_held(server):
        # Two writers at once: one waits for the lock, the other for its turn before it (on
        # PostgreSQL: for the clinic's lock). The bound covers both waits together.
        with ThreadPoolExecutor(2) as pool:
            posts = [pool.submit(timed_post, f"blocked-{n}") for n in range(2)]
            time.sleep(bound / 4)
            started = time.monotonic()
            read = server.request("GET", "/tests?clinic_id=C001")
            read_elapsed = time.monotonic() - started
            writes_waiting = not any(post.done() for post in posts)
            answers = [post.result() for post in posts]

    assert read.status == 200 and [r["test_id"] for r in read.json()] == ["before"]
    assert writes_waiting and read_elapsed < bound / 2, "the read was not answered while the writes waited"
    for resp, elapsed in answers:
        assert resp.status == 503
        assert resp.headers["content-type"] == "application/problem+json"
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.json()["request_id"] == resp.headers["x-request-id"]
        assert bound * 0.9 <= elapsed < bound + 0.4, f"answered after {elapsed:.2f}s"
    # Once the lock is gone, the same writes go through: nothing was half-stored.
    assert [server.request("POST", "/tests", make_record(f"blocked-{n}")).status for n in range(2)] == [201, 201]


def test_two_instances_run_side_by_side_without_colliding(start_server, tmp_path):
    # gunicorn 27 would put its control socket at a fixed path under these (a second instance
    # silently takes it over): the config turns it off, so neither instance leaves one.
    home = tmp_path / "home"
    home.mkdir()
    shared = {"HOME": home, "XDG_RUNTIME_DIR": home}
    first = start_server(workers=1, db_path=tmp_path / "a.db", **shared)
    second = start_server(workers=1, db_path=tmp_path / "b.db", **shared)
    assert first.port != second.port
    assert list(home.rglob("*")) == []
    assert first.request("POST", "/tests", make_record("only-in-a")).status == 201
    assert clinic_ids(first, "C001") == ["only-in-a"]
    assert clinic_ids(second, "C001") == []


@pytest.mark.both_engines
def test_logs_are_json_carry_the_request_id_and_never_clinical_data(start_server):
    server = start_server(workers=2)
    secret_result = "SECRET-RESULT-7f3a"
    secret_notes = "SECRET-NOTES-91c2"
    record = make_record("log-1", result=secret_result, notes=secret_notes)
    assert server.request("POST", "/tests", record, {"X-Request-ID": "log-create"}).status == 201
    assert server.request("POST", "/tests", record, {"X-Request-ID": "log-dup"}).status == 409
    assert server.request("POST", "/tests", {**record, "test_id": "bad id"}, {"X-Request-ID": "log-bad"}).status == 400
    assert server.request("GET", "/tests?clinic_id=C001", headers={"X-Request-ID": "log-list"}).status == 200
    server.terminate()

    lines = server.log_lines()  # fails if any line, gunicorn's included, is not JSON
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    assert all(line["ts"].endswith("Z") for line in lines)
    assert any(line["logger"].startswith("gunicorn") for line in lines)

    def story(request_id):
        return [line for line in lines if line.get("request_id") == request_id]

    create = story("log-create")
    assert [line["message"] for line in create] == ["committed", "request completed"]
    assert create[0]["test_id"] == "log-1" and create[0]["version"] == 1
    assert {k: create[-1][k] for k in ("method", "path", "status")} == {"method": "POST", "path": "/tests", "status": 201}
    assert isinstance(create[-1]["duration_ms"], (int, float))
    assert [line["message"] for line in story("log-dup")][-1] == "request completed"
    assert {"transaction rolled back", "record not stored: test_id exists"} <= {line["message"] for line in story("log-dup")}
    assert [line.get("status") for line in story("log-bad")][-1] == 400
    assert story("log-list")[-1]["count"] == 1

    # Every line the app wrote, but those of a worker starting, was written for a request and names it.
    starting = ("database ready", "schema migrated", "schema created", "access control is DISABLED")
    app_lines = [line for line in lines if line["logger"].startswith("records_service")]
    assert len(app_lines) > len(story("log-create")) + len(story("log-dup"))
    assert [line["message"] for line in app_lines
            if "request_id" not in line and not line["message"].startswith(starting)] == []

    text = server.output()
    assert secret_result not in text and secret_notes not in text


def test_requests_are_served_over_http_with_chunked_bodies(start_server):
    server = start_server(workers=1)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    body = json.dumps(make_record("chunked-1")).encode()
    conn.request("POST", "/tests", body=iter([body[:20], body[20:]]), headers={"Content-Type": "application/json"},
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 201, resp.read()
    assert clinic_ids(server, "C001") == ["chunked-1"]


def test_a_chunked_body_over_the_limit_is_413(start_server):
    server = start_server(workers=1, RECORDS_MAX_BODY_BYTES=1000)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/tests", body=iter([b"{" + b" " * 999, b" " * 1000]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    assert conn.getresponse().status == 413
    assert request(server.port, "GET", "/health").status == 200


def _raw_exchange(port: int, head: bytes, body: bytes, half_close: bool = True) -> bytes:
    """Send a request byte for byte (half-closing after it, as a client that has nothing more
    to say), and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(head + body)
        if half_close:
            client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize("path", ["/tests", "/tests/_batch"])
@pytest.mark.parametrize("name, chunks", [
    ("zz as a chunk size", b"zz\r\n{}\r\n0\r\n\r\n"),
    ("no final 0 chunk", b"2\r\n{}\r\n"),
    ("a chunk shorter than its size", b"10\r\n{}"),
    ("no CRLF after a chunk", b"2\r\n{}XX0\r\n\r\n"),
])
def test_a_broken_chunked_body_is_400_problem_not_500(start_server, path, name, chunks):
    server = start_server(workers=1)
    answer = _raw_exchange(server.port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                        f"Transfer-Encoding: chunked\r\nX-Request-ID: broken-chunks\r\n\r\n".encode(),
                           chunks)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"application/problem+json" in head
    problem = json.loads(body)
    assert problem["status"] == 400 and problem["request_id"] == "broken-chunks"
    assert "chunk" in problem["detail"]
    assert request(server.port, "GET", "/health").status == 200
    assert clinic_ids(server, "C001") == []
