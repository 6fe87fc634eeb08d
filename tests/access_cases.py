"""The OWASP-style access checks as data: one request factory per route and method of API.md,
and the scenarios every one of them goes through (no key, malformed, unknown, wrong secret,
revoked, wrong role, another clinic, the right key, admin).

`check_route` runs them against anything that can send a request: the app through
falcon.testing (test_access.py) or a real gunicorn (test_access_live.py). A factory exists
for every route API.md names, including those other branches add, so that when they land
the same checks run on them; a served route without a factory fails test_access.py.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

from records_service import keys as api_keys
from records_service.access import PUBLIC
from records_service.config import Settings
from records_service.store import open_store
from tests.live import RawDatabase, Response

CLINIC, OTHER_CLINIC = "C001", "C002"
NOW = "2025-06-01T12:00:00.000Z"
# Values of the records every scenario targets: no refused answer may contain any of them.
SENTINELS = ("PATIENT-SENTINEL-5c1", "RESULT-SENTINEL-9e2", "NOTES-SENTINEL-77a")


@dataclass
class Call:
    method: str
    path: str  # with the query string
    body: bytes | None = None
    headers: dict = field(default_factory=dict)


class Sender(Protocol):
    db_path: Path
    database_url: str | None  # PostgreSQL's, instead of the SQLite file at db_path

    def send(self, call: Call) -> Response: ...


def record(test_id: str, clinic_id: str = CLINIC, **changes) -> dict:
    return {"test_id": test_id, "clinic_id": clinic_id, "patient_id": SENTINELS[0], "test_type": "HbA1c",
            "result": SENTINELS[1], "unit": None, "status": "final", "collected_at": "2025-05-01T10:00:00Z",
            "notes": SENTINELS[2], **changes}


def json_call(method: str, path: str, doc, **headers) -> Call:
    return Call(method, path, json.dumps(doc).encode(), {"Content-Type": "application/json", **headers})


@dataclass
class Target:
    """What a request is about: a stored record (version 1) of `clinic_id`, the request that
    stored it, and a test_id nobody has used yet."""
    clinic_id: str
    test_id: str
    request_id: str
    fresh_id: str


def batch_refused(answer: Response) -> bool:
    """API.md: a batch carrying another clinic's record fails that record with 403, or is
    refused whole with 403."""
    if answer.status == 403:
        return True
    return answer.status == 200 and [f["status"] for f in answer.json()["failed"]] == [403]


@dataclass
class RouteCase:
    needs: str                         # the role API.md says the route needs
    build: Callable[[Target], Call]
    ok: int                            # the status for the right key
    other: int | Callable[[Response], bool] | None = None  # a key of another clinic; None: no clinic


# Every route and method API.md names, keyed as access.ROUTE_ROLES is: (template, method).
ROUTES: dict[tuple[str, str], RouteCase] = {
    ("/health", "GET"): RouteCase(PUBLIC, lambda t: Call("GET", "/health"), 200),
    ("/ready", "GET"): RouteCase(PUBLIC, lambda t: Call("GET", "/ready"), 200),
    ("/openapi.json", "GET"): RouteCase(PUBLIC, lambda t: Call("GET", "/openapi.json"), 200),
    ("/", "GET"): RouteCase("admin", lambda t: Call("GET", "/"), 200),
    ("/tests", "POST"): RouteCase(
        "ingest", lambda t: json_call("POST", "/tests", record(t.fresh_id, t.clinic_id)), 201, other=403),
    ("/tests", "GET"): RouteCase("read", lambda t: Call("GET", f"/tests?clinic_id={t.clinic_id}"), 200, other=403),
    ("/tests/_batch", "POST"): RouteCase(
        "ingest", lambda t: json_call("POST", "/tests/_batch", [record(t.fresh_id, t.clinic_id)]), 200,
        other=batch_refused),
    ("/tests/_export", "GET"): RouteCase(
        "read", lambda t: Call("GET", f"/tests/_export?clinic_id={t.clinic_id}"), 200, other=403),
    ("/tests/_stats", "GET"): RouteCase(
        "read", lambda t: Call("GET", f"/tests/_stats?clinic_id={t.clinic_id}"), 200, other=403),
    ("/tests/{test_id}", "GET"): RouteCase("read", lambda t: Call("GET", f"/tests/{t.test_id}"), 200, other=404),
    ("/tests/{test_id}", "PUT"): RouteCase(
        "ingest", lambda t: json_call("PUT", f"/tests/{t.test_id}",
                                      record(t.test_id, t.clinic_id, status="corrected", result=1.5),
                                      **{"If-Match": '"1"'}), 200, other=404),
    ("/tests/{test_id}", "DELETE"): RouteCase(
        "ingest", lambda t: Call("DELETE", f"/tests/{t.test_id}", headers={"If-Match": '"1"'}), 200, other=404),
    ("/tests/{test_id}/history", "GET"): RouteCase(
        "read", lambda t: Call("GET", f"/tests/{t.test_id}/history"), 200, other=404),
    ("/audit/{request_id}", "GET"): RouteCase("admin", lambda t: Call("GET", f"/audit/{t.request_id}"), 200),
}
# API.md: every GET route also answers HEAD, with what GET needs and answers (see HeadLikeGet).
ROUTES.update({
    (template, "HEAD"): replace(case, build=lambda t, build=case.build: replace(build(t), method="HEAD"))
    for (template, method), case in list(ROUTES.items()) if method == "GET"
})


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def basic(password: str, user: str = "admin") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@dataclass
class Keys:
    """Tokens made through keys.create_key on the database the server uses."""
    admin: str
    revoked_admin: str
    right: dict[str, str]         # role -> a key with only that role, scoped to CLINIC
    other_clinic: dict[str, str]  # role -> a key with that role, scoped to OTHER_CLINIC
    wrong_role: dict[str, str]    # role -> a key with every other role, scoped to CLINIC
    secrets: list[str] = field(default_factory=list)  # every token, for grepping logs


def make_keys(db_path: Path, database_url: str | None = None) -> Keys:
    store = open_store(Settings(db_path=str(db_path), database_url=database_url))
    made: list[str] = []

    def create(roles: list[str], clinics: list[str] | None) -> str:
        _, token = api_keys.create_key(store, name="test " + "+".join(roles), roles=roles, clinics=clinics, now=NOW)
        made.append(token)
        return token

    try:
        revoked = create(["admin"], None)
        store.revoke_key(api_keys.parse_token(revoked)[0], NOW)
        admin = create(["admin"], None)
        return Keys(
            admin=admin,
            revoked_admin=revoked,
            right={"ingest": create(["ingest"], [CLINIC]), "read": create(["read"], [CLINIC]), "admin": admin},
            other_clinic={"ingest": create(["ingest"], [OTHER_CLINIC]), "read": create(["read"], [OTHER_CLINIC])},
            wrong_role={"ingest": create(["read"], [CLINIC]), "read": create(["ingest"], [CLINIC]),
                        "admin": create(["ingest", "read"], [CLINIC])},
            secrets=made,
        )
    finally:
        store.close()


def snapshot(sender: Sender) -> dict[str, list]:
    """Every row of every table but the keys: a refused request must leave it as it was."""
    db = RawDatabase(str(sender.db_path), sender.database_url)
    try:
        tables = db.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
                            if sender.database_url else "SELECT name FROM sqlite_master WHERE type = 'table'")
        return {name: sorted(db.execute(f'SELECT * FROM "{name}"'), key=repr) for (name,) in tables
                if name != "api_keys"}
    finally:
        db.close()


def seed(sender: Sender, keys: Keys) -> Target:
    """A new record of CLINIC, stored by the admin key, so every scenario starts at version 1."""
    test_id, request_id = f"acc-{uuid.uuid4().hex[:12]}", f"seed-{uuid.uuid4().hex}"
    answer = sender.send(json_call("POST", "/tests", record(test_id), **bearer(keys.admin), **{"X-Request-ID": request_id}))
    assert answer.status == 201, answer.body
    return Target(CLINIC, test_id, request_id, f"new-{uuid.uuid4().hex[:12]}")


def _refused(answer: Response, status: int) -> list[str]:
    """What is wrong with a refusal: its status, its problem+json shape, anything it leaks."""
    problems = []
    if answer.status != status:
        return [f"status {answer.status}, expected {status}: {answer.body[:300]!r}"]
    if answer.headers.get("content-type") != "application/problem+json":
        problems.append(f"content-type {answer.headers.get('content-type')}")
    elif answer.json().get("request_id") != answer.headers.get("x-request-id"):
        problems.append("the problem does not carry the response's request ID")
    leaked = [s for s in SENTINELS if s.encode() in answer.body]
    if leaked:
        problems.append(f"leaks record data {leaked}")
    return problems


def _unauthorized(answer: Response, browser: bool) -> list[str]:
    problems = _refused(answer, 401)
    challenge = answer.headers.get("www-authenticate", "")
    if browser and challenge != 'Basic realm="records_service"':
        problems.append(f"dashboard challenge {challenge!r}")
    if not browser and challenge.split(" ")[0] != "Bearer":
        problems.append(f"API challenge {challenge!r}")
    return problems


def _comparable(answer: Response, test_id: str) -> tuple:
    """A refusal as a client sees it, minus what differs between any two requests."""
    body = answer.json() if answer.headers.get("content-type", "").endswith("json") else answer.body
    if isinstance(body, dict):
        body = {k: (v.replace(test_id, "ID") if isinstance(v, str) else v) for k, v in body.items() if k != "request_id"}
    volatile = {"x-request-id", "server-timing", "date"}
    return answer.status, body, sorted(k for k in answer.headers if k not in volatile)


def unknown_token() -> str:
    return f"rs_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


def with_wrong_secret(token: str) -> str:
    key_id, _ = api_keys.parse_token(token)
    return f"rs_{key_id}_{secrets.token_urlsafe(32)}"


@dataclass
class HeadLikeGet:
    """Sends each HEAD call as HEAD and again as GET, notes where HEAD answers differently (a
    status or header other than GET's, or a body), and hands back GET's answer to be judged."""
    sender: Sender
    problems: list[str]

    @property
    def db_path(self) -> Path:
        return self.sender.db_path

    @property
    def database_url(self) -> str | None:
        return self.sender.database_url

    def send(self, call: Call) -> Response:
        if call.method != "HEAD":
            return self.sender.send(call)
        head = self.sender.send(call)
        get = self.sender.send(replace(call, method="GET"))
        # Framing is left out: a refusal's detail names the method it refuses (Content-Length), and
        # gunicorn frames no body for HEAD (no Transfer-Encoding: chunked), as RFC 9110 9.3.2 allows.
        volatile = {"x-request-id", "server-timing", "date", "content-length", "transfer-encoding"}
        if (head.status, head.body) != (get.status, b"") or \
                {k: v for k, v in head.headers.items() if k not in volatile} != \
                {k: v for k, v in get.headers.items() if k not in volatile}:
            self.problems.append(f"HEAD {call.path}: {head.status} {head.headers} {head.body[:100]!r} where GET"
                                 f" answers {get.status} {get.headers}")
        return get


def check_route(sender: Sender, keys: Keys, template: str, method: str) -> list[str]:
    """Every scenario for one route; returns what went wrong, as readable lines."""
    case = ROUTES[(template, method)]
    browser = template == "/"
    problems: list[str] = []
    if method == "HEAD":
        sender = HeadLikeGet(sender, problems)

    def run(headers: dict) -> tuple[Target, Response, dict]:
        target = seed(sender, keys)
        call = case.build(target)
        call.headers.update(headers)
        before = snapshot(sender)
        answer = sender.send(call)
        return target, answer, before

    def note(scenario: str, found: list[str]) -> None:
        problems.extend(f"{method} {template} [{scenario}]: {p}" for p in found)

    if case.needs == PUBLIC:
        for scenario, headers in (("no key", {}), ("malformed header", {"Authorization": "Bearer ???"})):
            _, answer, _ = run(headers)
            note(scenario, [] if answer.status == case.ok else [f"status {answer.status}, expected {case.ok}"])
        return problems

    unauthenticated = {
        "no key": {},
        "malformed bearer": bearer("not-a-key"),
        "empty bearer": {"Authorization": "Bearer "},
        "valid key, unknown scheme": {"Authorization": f"Token {keys.admin}"},
        "unknown key": bearer(unknown_token()),
        "admin key id, wrong secret": bearer(with_wrong_secret(keys.admin)),
        "revoked admin key": bearer(keys.revoked_admin),
    }
    if browser:
        unauthenticated["basic, revoked admin key"] = basic(keys.revoked_admin)
    for scenario, headers in unauthenticated.items():
        _, answer, before = run(headers)
        found = _unauthorized(answer, browser)
        if snapshot(sender) != before:
            found.append("the refused request changed stored data")
        note(scenario, found)

    _, answer, before = run(bearer(keys.wrong_role[case.needs]))
    found = _refused(answer, 403)
    if "www-authenticate" in answer.headers:
        found.append("a 403 offers a challenge")
    if snapshot(sender) != before:
        found.append("the refused request changed stored data")
    note("wrong role", found)

    if case.other is not None:
        target, answer, before = run(bearer(keys.other_clinic[case.needs]))
        if callable(case.other):
            found = [] if case.other(answer) else [f"not refused: {answer.status} {answer.body[:300]!r}"]
            found += [f"leaks record data {s}" for s in SENTINELS if s.encode() in answer.body]
        else:
            found = _refused(answer, case.other)
        if snapshot(sender) != before:
            found.append("the refused request changed stored data")
        if case.other == 404:
            # Not revealed: the same answer as for a record that does not exist (same id length).
            missing = Target(target.clinic_id, "x" * len(target.test_id), target.request_id, target.fresh_id)
            call = case.build(missing)
            call.headers.update(bearer(keys.other_clinic[case.needs]))
            if _comparable(answer, target.test_id) != _comparable(sender.send(call), missing.test_id):
                found.append("answers differently than for a record that does not exist")
        note("other clinic", found)

    allowed = {"right key": bearer(keys.right[case.needs]), "admin key": bearer(keys.admin)}
    if browser:
        allowed["admin key as the Basic password"] = basic(keys.admin)
    for scenario, headers in allowed.items():
        _, answer, _ = run(headers)
        if answer.status != case.ok:
            note(scenario, [f"status {answer.status}, expected {case.ok}: {answer.body[:300]!r}"])
    return problems
