"""A body not received in time is a 408, so slow and stalled clients cannot hold gunicorn (no nginx here)."""

from __future__ import annotations

import json
import socket
import time

from records_service.body_deadline import Watchdog
from tests.live import SlowClients, parse_raw_response, send_raw
from tests.test_gunicorn import make_record

BODY = json.dumps(make_record("slow-1")).encode()


def post_head(length: int = len(BODY), request_id: str = "slow") -> bytes:
    return (f"POST /tests HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            f"X-Request-ID: {request_id}\r\n\r\n").encode()


def assert_no_500_or_traceback(server) -> None:
    lines = server.log_lines()
    assert [line for line in lines if line.get("status", 0) >= 500] == []
    assert not any("Traceback" in line.get("exc_info", "") + line["message"] for line in lines)
    assert not any("WORKER TIMEOUT" in line["message"] for line in lines)


def test_the_watchdog_calls_what_is_armed_at_its_deadline_unless_disarmed_first():
    watchdog = Watchdog()
    went_off = []
    now = time.monotonic()
    late = watchdog.arm(now + 0.2, lambda: went_off.append("late"))
    disarmed = watchdog.arm(now + 0.1, lambda: went_off.append("disarmed"))
    early = watchdog.arm(now + 0.05, lambda: went_off.append("early"))
    assert watchdog.disarm(disarmed) is False
    time.sleep(0.5)
    assert went_off == ["early", "late"]
    assert watchdog.disarm(early) is True and watchdog.disarm(late) is True


def test_a_body_that_stops_short_is_answered_408_by_the_deadline_never_500(start_server):
    server = start_server(workers=1, RECORDS_BODY_TIMEOUT_MS=1000)
    # Half the body, then nothing: before the deadline, this held the sync worker until gunicorn's
    # 30 s WORKER TIMEOUT, which answered an HTML 500 and logged a traceback.
    raw, elapsed = send_raw(server.port, post_head(request_id="stalled-1") + BODY[:len(BODY) // 2], timeout=20)

    resp = parse_raw_response(raw)
    assert resp.status == 408
    assert resp.headers["content-type"] == "application/problem+json"
    problem = resp.json()
    assert problem["status"] == 408 and problem["request_id"] == "stalled-1"
    assert problem["type"].endswith(":request-timeout") and "1 s" in problem["detail"]
    assert 0.9 <= elapsed < 5, f"answered after {elapsed:.1f}s"
    # The service goes on serving, and nothing of the cut-off record was stored.
    assert server.request("POST", "/tests", make_record("after")).status == 201
    assert [r["test_id"] for r in server.request("GET", "/tests?clinic_id=C001").json()] == ["after"]
    completed = [line for line in server.log_lines() if line.get("request_id") == "stalled-1"]
    assert {"request body not received in time"} < {line["message"] for line in completed}
    assert completed[-1]["status"] == 408
    assert_no_500_or_traceback(server)


def test_a_chunked_body_that_stops_short_is_answered_408_too(start_server):
    server = start_server(workers=1, RECORDS_BODY_TIMEOUT_MS=1000)
    head = (b"POST /tests HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"X-Request-ID: stalled-chunked\r\n\r\n")
    raw, elapsed = send_raw(server.port, head + b"%x\r\n%s\r\n" % (20, BODY[:20]), timeout=20)

    resp = parse_raw_response(raw)
    assert resp.status == 408 and resp.json()["request_id"] == "stalled-chunked"
    assert elapsed < 5
    assert_no_500_or_traceback(server)


def test_clients_sending_a_byte_a_second_hold_gunicorn_no_longer_than_the_deadline(start_server):
    timeout_s = 2
    server = start_server(workers=2, RECORDS_BODY_TIMEOUT_MS=timeout_s * 1000)
    # As many as gunicorn reads requests at once: every slot is taken. (More would be cut off in
    # rounds, one deadline each: gunicorn alone bounds slow clients; nginx makes them harmless.)
    slow_count = server.request_slots()
    with SlowClients(server.port, post_head(), BODY, count=slow_count) as slow:
        started = time.monotonic()
        resp = server.request("GET", "/tests?clinic_id=C001", timeout=30)
        waited = time.monotonic() - started
        slow.wait(timeout_s * 3)

    assert resp.status == 200
    # Without the deadline this request waited for gunicorn's 30 s worker timeout (sync workers)
    # or for ever (threads); now for the slow clients' deadline at most.
    assert waited < timeout_s + 2, f"a normal request waited {waited:.1f}s behind {slow_count} slow clients"
    answers = [parse_raw_response(raw).status if raw else "closed" for raw in slow.answers]
    assert len(answers) == slow_count and set(answers) <= {408, "closed"} and 408 in answers
    assert_no_500_or_traceback(server)


def test_a_body_sent_in_pieces_within_the_deadline_is_served(start_server):
    server = start_server(workers=1, RECORDS_BODY_TIMEOUT_MS=1500)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for piece in (post_head(request_id="in-time") + BODY[:10], BODY[10:40], BODY[40:]):
            sock.sendall(piece)
            time.sleep(0.3)
        answer = sock.recv(65536)
    assert parse_raw_response(answer).status == 201
    time.sleep(1.5)  # past the deadline: nothing goes off for a request already answered
    assert server.request("GET", "/tests/slow-1").status == 200
    assert "request body not received in time" not in server.output()
    assert_no_500_or_traceback(server)
