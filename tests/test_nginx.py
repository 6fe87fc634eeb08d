"""deploy/nginx.conf, run by Debian's nginx in front of real gunicorn: requests pass through with
one request ID, the errors nginx answers itself are problem+json, a POST is never replayed, and
slow clients cost nginx a connection, never a gunicorn worker."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time

import pytest

from tests.live import SlowClients, parse_raw_response, send_raw
from tests.test_body_deadline import BODY, post_head
from tests.test_gunicorn import make_record

PROBLEM = "urn:records-service:problem:"


def assert_problem(resp, status: int, kind: str) -> dict:
    """An error as nginx answers it: problem+json with every member, its ID in X-Request-ID."""
    assert resp.status == status, resp.body
    assert resp.headers["content-type"] == "application/problem+json"
    problem = resp.json()
    assert problem["type"] == PROBLEM + kind and problem["status"] == status
    assert problem["title"] and problem["detail"]
    assert problem["request_id"] == resp.headers["x-request-id"]
    return problem


def upstream(server) -> str:
    return f"127.0.0.1:{server.port}"


def get_until(proxy, path: str, status: int, deadline_s: float = 5):
    """GET `path` until the answer has `status`, for `deadline_s` at most; the last answer."""
    deadline = time.monotonic() + deadline_s
    while (resp := proxy.request("GET", path)).status != status and time.monotonic() < deadline:
        time.sleep(0.05)
    return resp


def served(server) -> list[dict]:
    """The completion line of every request gunicorn served, but the /health probes of start-up."""
    return [line for line in server.log_lines() if line["message"] == "request completed" and line["path"] != "/health"]


def test_records_go_through_nginx_and_one_request_id_names_them_in_both_logs(start_server, start_nginx):
    server = start_server(workers=2)
    proxy = start_nginx([upstream(server)])

    created = proxy.request("POST", "/tests", make_record("via-nginx"), {"X-Request-ID": "nginx-post-1"})
    assert created.status == 201 and created.json()["request_id"] == "nginx-post-1"
    assert created.headers["x-request-id"] == "nginx-post-1"
    listed = proxy.request("GET", "/tests?clinic_id=C001")  # no X-Request-ID: nginx makes one
    assert listed.status == 200 and [r["test_id"] for r in listed.json()] == ["via-nginx"]
    spoofed = proxy.request("GET", "/health", headers={"X-Request-ID": "not well formed!"})

    nginx_ids = {line["request_id"]: line for line in proxy.access_log(waiting_for=3)}
    app_ids = {line["request_id"] for line in server.log_lines() if line["message"] == "request completed"}
    for resp in (created, listed, spoofed):
        request_id = resp.headers["x-request-id"]
        assert request_id in nginx_ids and request_id in app_ids
        assert nginx_ids[request_id]["status"] == resp.status
    assert spoofed.headers["x-request-id"] != "not well formed!"


def test_the_services_own_errors_pass_through_untouched(start_server, start_nginx):
    server = start_server(workers=1)
    proxy = start_nginx([upstream(server)])
    # A declared length over the service's limit: the service answers 413 before reading it.
    too_large = proxy.request("POST", "/tests", b"x" * 100, {"Content-Type": "text/plain"})
    assert too_large.status == 415 and too_large.headers["content-type"] == "application/problem+json"
    invalid = proxy.request("POST", "/tests", {**make_record("x"), "result": True})
    assert invalid.status == 400 and invalid.json()["errors"][0]["field"] == "result"
    unknown = proxy.request("GET", "/no/such/path")
    assert unknown.status == 404 and unknown.headers["content-type"] == "application/problem+json"
    assert [line["status"] for line in served(server)] == [415, 400, 404]


def test_a_body_over_the_services_limit_is_refused_by_nginx_with_that_limit_never_a_502(start_server,
                                                                                        start_nginx):
    server = start_server(workers=1)
    proxy = start_nginx([upstream(server)])
    for _ in range(5):  # the service would answer without reading it: a race nginx lost as 502
        one = proxy.request("POST", "/tests", b"x" * (1_048_576 + 1), {"Content-Type": "application/json"})
        assert one.status == 413 and "1048576" in one.json()["detail"], one.body
    batch = proxy.request("POST", "/tests/_batch", b"{}\n" * 1000, {"Content-Type": "application/x-ndjson"})
    assert batch.status == 200  # a batch of 3 KB passes the batch location
    assert [line["status"] for line in served(server)] == [200]


LONG = "a" * 5000


@pytest.mark.parametrize("raw, status, kind", [
    (b"POST /tests HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 16777217\r\n\r\n",
     413, "too-large"),
    (f"GET /tests?clinic_id=C001&x={LONG} HTTP/1.1\r\nHost: t\r\n\r\n".encode(), 414, "uri-too-long"),
    (f"GET /tests?clinic_id=C001 HTTP/1.1\r\nHost: t\r\nX-Long: {LONG}\r\n\r\n".encode(), 431, "headers-too-large"),
    (("GET /tests?clinic_id=C001 HTTP/1.1\r\nHost: t\r\n" + "".join(f"X-{n}: {LONG[:3000]}\r\n" for n in range(6))
      + "\r\n").encode(), 431, "headers-too-large"),
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad-request"),
    (b"GET /tests HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n", 400, "bad-request"),
    (b"GET /_nginx/problem/502 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 404, "not-found"),
], ids=["body-over-16MiB", "uri-over-4KiB", "header-line-over-4KiB", "headers-over-16KiB", "bad-request-line",
        "bad-header-line", "error-page-asked-for"])
def test_errors_nginx_answers_itself_are_problem_json_and_never_reach_gunicorn(start_server, start_nginx, raw, status,
                                                                              kind):
    server = start_server(workers=1)
    proxy = start_nginx([upstream(server)])
    answer, _ = send_raw(proxy.port, raw, timeout=10)
    assert_problem(parse_raw_response(answer), status, kind)
    assert served(server) == []


def test_a_stalled_body_is_cut_off_by_nginx_and_never_reaches_gunicorn(start_server, start_nginx):
    server = start_server(workers=1)
    proxy = start_nginx([upstream(server)])
    answer, elapsed = send_raw(proxy.port, post_head(request_id="stalled-at-nginx") + BODY[:20], timeout=30)

    # client_body_timeout (10 s) between two reads, well before gunicorn's 30 s worker timeout:
    # nginx closes the connection (and logs 408), or answers 408 problem+json.
    assert answer == b"" or assert_problem(parse_raw_response(answer), 408, "request-timeout")
    assert 9 <= elapsed < 15, f"cut off after {elapsed:.1f}s"
    assert [line["status"] for line in proxy.access_log(waiting_for=1) if line["request_id"] == "stalled-at-nginx"] == [408]
    assert server.log_lines() and not any(line.get("request_id") == "stalled-at-nginx" for line in server.log_lines())


def test_clients_sending_a_byte_a_second_do_not_delay_anyone_else(start_server, start_nginx):
    server = start_server(workers=2)
    proxy = start_nginx([upstream(server)])
    slow_count = server.request_slots() * 2  # twice what gunicorn alone could hold
    # Half send their body a byte a second, half their headers.
    with SlowClients(proxy.port, post_head(), BODY, count=slow_count), \
            SlowClients(proxy.port, b"", post_head() + BODY, count=slow_count):
        waits = []
        for n in range(6):
            started = time.monotonic()
            created = proxy.request("POST", "/tests", make_record(f"fast-{n}"), timeout=10)
            listed = proxy.request("GET", f"/tests/fast-{n}", timeout=10)
            waits.append(time.monotonic() - started)
            assert (created.status, listed.status) == (201, 200)
            time.sleep(0.5)

    assert max(waits) < 1, f"a POST and a GET took up to {max(waits):.2f}s behind {2 * slow_count} slow clients"
    assert len(served(server)) == 12  # the slow clients never reached gunicorn


def test_502_problem_when_gunicorn_is_down(start_server, start_nginx):
    server = start_server(workers=1)
    proxy = start_nginx([upstream(server)])
    server.kill()
    for method, path, body in (("GET", "/tests?clinic_id=C001", None), ("POST", "/tests", make_record("lost"))):
        resp = proxy.request(method, path, body)
        assert_problem(resp, 502, "upstream-unavailable")
        assert int(resp.headers["retry-after"]) >= 1


def test_504_problem_when_gunicorn_does_not_answer_in_time_and_the_retried_post_is_409_identical(
        start_server, start_nginx):
    server = start_server(workers=1, RECORDS_BUSY_TIMEOUT_MS=3000)
    proxy = start_nginx([upstream(server)], proxy_read_timeout="1s")
    blocker = sqlite3.connect(server.db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the POST waits for the write lock, longer than nginx waits
    started = time.monotonic()
    resp = proxy.request("POST", "/tests", make_record("slow-write"))
    elapsed = time.monotonic() - started
    time.sleep(0.5)
    blocker.execute("ROLLBACK")
    blocker.close()

    problem = assert_problem(resp, 504, "upstream-timeout")
    assert "409" in problem["detail"] and 1 <= elapsed < 3
    # The service went on and stored it once the lock was gone; the client's retry says so.
    time.sleep(0.5)
    retried = server.request("POST", "/tests", make_record("slow-write"))
    assert retried.status == 409 and retried.json()["identical"] is True


def test_503_problem_when_one_client_holds_too_many_connections(start_server, start_nginx):
    server = start_server(workers=1)
    proxy = start_nginx([upstream(server)], limit_conn="records_per_client 1")
    # nginx counts a connection from when it has read its headers to when it sees it closed, a
    # moment after the client's side of each: ask until the answer changes.
    with SlowClients(proxy.port, post_head(), BODY, count=1):
        resp = get_until(proxy, "/health", 503)
    assert_problem(resp, 503, "too-many-connections")
    assert int(resp.headers["retry-after"]) >= 1
    assert get_until(proxy, "/health", 200).status == 200


def test_two_upstreams_one_down_every_request_is_served_by_the_other(start_server, start_nginx, tmp_path):
    first = start_server(workers=1, db_path=tmp_path / "shared.db")
    second = start_server(workers=1, db_path=tmp_path / "shared.db")
    proxy = start_nginx([upstream(first), upstream(second)])
    first.kill()
    answers = [proxy.request("POST", "/tests", make_record(f"two-{n}")).status for n in range(6)]
    answers += [proxy.request("GET", f"/tests/two-{n}").status for n in range(6)]
    assert answers == [201] * 6 + [200] * 6


class HangsUp:
    """An upstream that reads each request whole, then closes the connection without answering:
    a host dying with the request in hand. `methods` lists what it received."""

    def __init__(self) -> None:
        self.methods: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    body += conn.recv(65536)
                self.methods.append(head.split(b" ")[0].decode())

    def close(self) -> None:
        self._listener.close()


def test_a_post_is_never_replayed_on_the_other_host_but_a_get_is(start_server, start_nginx):
    server = start_server(workers=1)
    hangs_up = HangsUp()
    try:
        # The host that hangs up is listed first, so nginx tries it first.
        reads = start_nginx([f"127.0.0.1:{hangs_up.port}", upstream(server)])
        assert reads.request("GET", "/tests?clinic_id=C001").status == 200
        assert hangs_up.methods == ["GET"]  # tried there, then replayed on the other host

        writes = start_nginx([f"127.0.0.1:{hangs_up.port}", upstream(server)])
        resp = writes.request("POST", "/tests", make_record("maybe-stored"))
        assert_problem(resp, 502, "upstream-unavailable")
        assert hangs_up.methods == ["GET", "POST"]
        assert server.request("GET", "/tests/maybe-stored").status == 404  # not sent a second time
    finally:
        hangs_up.close()
