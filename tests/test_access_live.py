"""Access control in real gunicorn processes: the OWASP-style scenarios over HTTP, revocation
seen by every worker, no key material in the logs, RECORDS_AUTH=disabled warning per worker."""

from __future__ import annotations

import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import falcon.inspect
import pytest

from records_service.app import create_app
from records_service.config import Settings
from records_service.keys import parse_token
from tests.access_cases import CLINIC, ROUTES, Call, bearer, check_route, make_keys
from tests.live import Response, Server, run_cli


@dataclass
class LiveSender:
    server: Server

    @property
    def db_path(self):
        return self.server.db_path

    @property
    def database_url(self):
        return self.server.database_url

    def send(self, call: Call) -> Response:
        return self.server.request(call.method, call.path, call.body, call.headers)


def served_routes(tmp_path) -> list[tuple[str, str]]:
    """What the gunicorn workers serve: the same factory, introspected in this process."""
    app = create_app(Settings(db_path=str(tmp_path / "introspect.db"), auth="required"))
    return sorted({(r.path, m.method) for r in falcon.inspect.inspect_routes(app) for m in r.methods
                   if not m.internal})


@pytest.mark.both_engines
def test_every_scenario_of_every_served_route_holds_through_gunicorn_and_no_key_reaches_the_logs(
        start_server, tmp_path):
    server = start_server(workers=2, RECORDS_AUTH="required")
    keys = make_keys(server.db_path, server.database_url)
    routes = served_routes(tmp_path)
    assert set(routes) <= ROUTES.keys()

    problems = [p for route in routes for p in check_route(LiveSender(server), keys, *route)]
    assert problems == []

    server.terminate()
    assert _disabled_warnings(server) == []
    lines = server.log_lines()
    failures = [line for line in lines if line["message"] == "authentication failed"]
    assert failures and all(line.get("request_id") and line.get("reason") for line in failures)
    output = server.output()
    for token in keys.secrets:
        assert parse_token(token)[1] not in output


def _workers(server: Server, count: int, deadline_s: float = 20) -> list[int]:
    """The worker pids once there are `count` of them (the first may answer before the last is forked)."""
    deadline = time.monotonic() + deadline_s
    while len(server.worker_pids()) != count and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = server.worker_pids()
    assert len(pids) == count, f"{pids} after {deadline_s}s"
    return pids


def _get_until_every_worker_answered(server: Server, token: str, worker_pids: list[int],
                                     deadline_s: float = 30) -> dict[str, int]:
    """GET with `token` from 8 threads until each worker has answered at least once (the
    completion line names the worker's pid); {request_id: status} of every request sent."""
    statuses: dict[str, int] = {}

    def get(_) -> None:
        request_id = f"rev-{uuid.uuid4().hex}"
        resp = server.request("GET", f"/tests?clinic_id={CLINIC}", headers={**bearer(token), "X-Request-ID": request_id})
        statuses[request_id] = resp.status

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(get, range(24)))
        answered_by = {line["pid"] for line in server.log_lines()
                       if line["message"] == "request completed" and line.get("request_id") in statuses}
        if answered_by >= set(worker_pids):
            return statuses
    raise AssertionError(f"not every worker of {worker_pids} answered within {deadline_s}s")


def test_a_revoked_key_is_refused_from_the_next_request_in_every_worker(start_server):
    server = start_server(workers=3, RECORDS_AUTH="required")
    workers = _workers(server, 3)
    made = run_cli(server.db_path, "keys", "create", "--role", "read", "--clinic", CLINIC, "--name", "lab A")
    assert made.returncode == 0, made.stderr
    token = made.stdout.splitlines()[-1]
    key_id, secret = parse_token(token)

    before = _get_until_every_worker_answered(server, token, workers)
    assert set(before.values()) == {200}  # every worker has used the key

    revoked = run_cli(server.db_path, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    after = _get_until_every_worker_answered(server, token, workers)
    assert set(after.values()) == {401}
    assert server.worker_pids() == workers  # the same workers, not restarted ones

    lines = server.log_lines()
    refusals = [line for line in lines if line["message"] == "authentication failed" and line["request_id"] in after]
    assert len(refusals) == len(after)
    assert {(line["reason"], line["key_id"]) for line in refusals} == {("revoked-key", key_id)}
    assert secret not in server.output() + made.stderr + revoked.stdout + revoked.stderr


def _disabled_warnings(server: Server) -> list[dict]:
    return [line for line in server.log_lines()
            if line["level"] == "WARNING" and "RECORDS_AUTH=disabled" in line["message"]]


def _wait_for_warnings_from(server: Server, pids: list[int], deadline_s: float = 20) -> set[int]:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        warned = {line["pid"] for line in _disabled_warnings(server)}
        if warned >= set(pids):
            return warned
        time.sleep(0.05)
    raise AssertionError(f"no warning from every worker of {pids}:\n{server.output()}")


def test_disabled_access_control_warns_at_every_worker_start(start_server):
    server = start_server(workers=2, RECORDS_AUTH="disabled")
    first = _workers(server, 2)
    assert _wait_for_warnings_from(server, first) == set(first)
    assert server.request("GET", f"/tests?clinic_id={CLINIC}").status == 200

    os.kill(first[0], signal.SIGKILL)  # gunicorn starts a replacement worker, which warns again
    deadline = time.monotonic() + 20
    while first[0] in server.worker_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    now = _workers(server, 2)
    assert first[0] not in now
    assert _wait_for_warnings_from(server, now) == set(first) | set(now)
