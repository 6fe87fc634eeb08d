"""Access control through the real app factory: the route table, the OWASP-style scenarios for
every served route, deny by default, the dashboard's Basic auth, logs, RECORDS_AUTH=disabled."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import falcon
import falcon.inspect
import falcon.testing
import pytest

from records_service.access import ROUTE_ROLES
from records_service.app import create_app
from records_service.config import Settings
from records_service.errors import install as install_error_handlers
from records_service.keys import KeyRejected, create_key, parse_token
from records_service.middleware import Authenticate, RequestContext, presented_key
from records_service.store.sqlite import SQLiteStore as Store
from tests.access_cases import (
    CLINIC, OTHER_CLINIC, ROUTES, SENTINELS, Call, basic, bearer, check_route, json_call, make_keys, record, seed,
    unknown_token, with_wrong_secret,
)
from tests.live import Response


@dataclass
class AppSender:
    client: falcon.testing.TestClient
    db_path: Path
    database_url: str | None = None

    def send(self, call: Call) -> Response:
        path, _, query = call.path.partition("?")
        r = self.client.simulate_request(call.method, path, query_string=query or None, body=call.body,
                                         headers=call.headers)
        return Response(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)


def served_routes(app: falcon.App) -> set[tuple[str, str]]:
    """(template, method) of every responder the app has, Falcon's own 405/OPTIONS left out."""
    return {(route.path, m.method) for route in falcon.inspect.inspect_routes(app) for m in route.methods
            if not m.internal}


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "records.db"


@pytest.fixture
def app(db_path, clock) -> falcon.App:
    return create_app(Settings(db_path=str(db_path), auth="required"), clock=clock)


@pytest.fixture
def sender(app, db_path) -> AppSender:
    return AppSender(falcon.testing.TestClient(app), db_path)


@pytest.fixture
def keys(app, db_path):
    return make_keys(db_path)


# -- the table -------------------------------------------------------------------------------

def test_every_served_route_has_an_access_rule_and_a_request_factory(app):
    served = served_routes(app)
    ruled = {(template, method) for template, methods in ROUTE_ROLES.items() for method in methods}
    assert served - ruled == set(), "routes without an access rule (access.ROUTE_ROLES): refused to every key"
    assert served - ROUTES.keys() == set(), "routes without a request factory in tests/access_cases.py"


def test_the_table_names_exactly_the_routes_and_roles_api_md_names():
    table = {(template, method): role for template, methods in ROUTE_ROLES.items() for method, role in methods.items()}
    assert table == {route: case.needs for route, case in ROUTES.items()}


@pytest.mark.parametrize("route", sorted(ROUTES), ids=lambda r: f"{r[1]} {r[0]}")
def test_every_scenario_of_every_served_route_gets_the_status_api_md_names(route, app, sender, keys):
    assert route in served_routes(app), "API.md names this route; the app must serve it"
    assert check_route(sender, keys, *route) == []


# -- deny by default, 405, the dashboard ----------------------------------------------------------

class Page:
    def on_get(self, req, resp):
        resp.content_type = "text/html"
        resp.text = "<p>dashboard</p>"


def bare_app(db_path: Path, routes: dict) -> falcon.App:
    """RequestContext + Authenticate (required) in front of stand-in resources."""
    authenticate = Authenticate(Store(str(db_path)), required=True)
    app = falcon.App(middleware=[RequestContext(), authenticate])
    install_error_handlers(app)
    for template, resource in routes.items():
        app.add_route(template, resource)
    authenticate.learn_routes(app)
    return app


def test_a_route_without_a_rule_is_refused_to_every_key_and_logged_at_start(db_path, caplog):
    app = bare_app(db_path, {"/unlisted": Page()})
    keys = make_keys(db_path)
    assert any(r.message == "route has no access rule: refused to every key" and r.route == "/unlisted"
               for r in caplog.records)
    client = falcon.testing.TestClient(app)
    assert client.simulate_get("/unlisted").status_code == 401
    resp = client.simulate_get("/unlisted", headers=bearer(keys.admin))
    assert resp.status_code == 403 and resp.json["type"].endswith("no-access-rule")


def test_a_method_a_route_does_not_serve_stays_405_with_allow_without_a_key(sender):
    resp = sender.send(Call("DELETE", "/tests"))
    assert resp.status == 405 and "allow" in resp.headers and "www-authenticate" not in resp.headers


def test_the_dashboard_takes_the_admin_key_as_basic_password_and_challenges_with_basic(db_path):
    client = falcon.testing.TestClient(bare_app(db_path, {"/": Page()}))
    keys = make_keys(db_path)
    refused = client.simulate_get("/")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == 'Basic realm="records_service"'
    assert client.simulate_get("/", headers=basic(keys.admin, user="anyone")).text == "<p>dashboard</p>"
    assert client.simulate_get("/", headers=bearer(keys.admin)).status_code == 200
    assert client.simulate_get("/", headers=basic(keys.right["read"])).status_code == 403
    assert client.simulate_get("/", headers=basic(keys.revoked_admin)).status_code == 401


def test_the_api_takes_no_basic_auth(sender, keys):
    resp = sender.send(Call("GET", f"/tests?clinic_id={CLINIC}", headers=basic(keys.admin)))
    assert resp.status == 401 and resp.headers["www-authenticate"] == 'Bearer error="invalid_token"'


@pytest.mark.parametrize("header, basic_ok, reason", [
    (None, False, "missing-key"),
    ("", False, "missing-key"),
    ("   ", False, "missing-key"),
    ("Bearer", False, "malformed-header"),
    ("Bearer ", False, "malformed-header"),
    ("Bearerrs_x", False, "missing-scheme"),
    ("rs_0123456789abcdef_" + "a" * 43, False, "missing-scheme"),
    ("Token abc", False, "unsupported-scheme"),
    ("Basic YWRtaW46cGFzcw==", False, "unsupported-scheme"),  # Basic only where a browser is expected
    ("Basic", True, "malformed-header"),
    ("Basic !!!", True, "malformed-header"),
    ("Basic bm9jb2xvbg==", True, "malformed-header"),  # "nocolon"
    ("Basic /w==", True, "malformed-header"),  # not UTF-8
])
def test_a_missing_or_malformed_authorization_header_is_rejected_with_its_reason(header, basic_ok, reason):
    with pytest.raises(KeyRejected) as rejected:
        presented_key(header, basic=basic_ok)
    assert (rejected.value.reason, rejected.value.key_id) == (reason, None)


@pytest.mark.parametrize("header, says", [
    ("KEY", "has no scheme before the key: send Authorization: Bearer <key>"),
    ("Token KEY", "the Authorization scheme must be Bearer"),
    ("Bearer rs_0123456789abcdef_" + "a" * 43, "the API key is not valid"),
    (None, "needs an API key: send Authorization: Bearer <key>"),
])
def test_a_401_says_what_to_fix_in_the_authorization_header(sender, keys, header, says):
    headers = {} if header is None else {"Authorization": header.replace("KEY", keys.admin)}
    resp = sender.send(Call("GET", f"/tests?clinic_id={CLINIC}", headers=headers))
    assert resp.status == 401 and says in resp.json()["detail"]
    assert keys.admin not in resp.body.decode() and parse_token(keys.admin)[1] not in resp.body.decode()


@pytest.mark.parametrize("header, basic_ok, key", [
    ("Bearer abc", False, "abc"),
    ("bearer   abc  ", False, "abc"),
    ("Basic YWRtaW46cGFzczp3aXRoOmNvbG9ucw==", True, "pass:with:colons"),
])
def test_the_key_is_taken_from_bearer_or_the_basic_password(header, basic_ok, key):
    assert presented_key(header, basic=basic_ok) == key


# -- clinics, 409 ---------------------------------------------------------------------------

def test_a_key_sees_exactly_its_clinics(sender, keys, db_path):
    _, both = create_key(Store(str(db_path)), name="two clinics", roles=["read"], clinics=[CLINIC, "C003"],
                         now="2025-06-01T12:00:00.000Z")
    for clinic, status in ((CLINIC, 200), ("C003", 200), (OTHER_CLINIC, 403)):
        assert sender.send(Call("GET", f"/tests?clinic_id={clinic}", headers=bearer(both))).status == status
    assert sender.send(Call("GET", f"/tests?clinic_id={OTHER_CLINIC}", headers=bearer(keys.admin))).status == 200


def test_ingest_over_another_clinics_test_id_is_a_409_that_says_nothing_about_the_stored_record(sender, keys):
    stored = seed(sender, keys)
    # Even a body that repeats the stored record except for the clinic: `identical` needs the
    # same clinic_id, which a key outside that clinic can never send, so it is always false.
    for body in (record(stored.test_id, OTHER_CLINIC), record(stored.test_id, OTHER_CLINIC, result="guess")):
        resp = sender.send(json_call("POST", "/tests", body, **bearer(keys.other_clinic["ingest"])))
        assert resp.status == 409
        problem = resp.json()
        assert problem["identical"] is False
        assert set(problem) == {"type", "title", "status", "detail", "request_id", "identical"}
        assert CLINIC not in resp.body.decode() and "created_at" not in resp.body.decode()
        assert not any(s.encode() in resp.body for s in SENTINELS)


# -- logs ----------------------------------------------------------------------------------

def test_each_authentication_failure_is_one_line_with_reason_and_key_id_and_no_key_material(sender, keys, log_lines):
    wrong = with_wrong_secret(keys.admin)
    unknown = unknown_token()
    cases = {
        "missing": ({}, "missing-key", None),
        "malformed": (bearer("rs_" + "x" * 60), "malformed-key", None),
        "unknown": (bearer(unknown), "unknown-key", parse_token(unknown)[0]),
        "wrong-secret": (bearer(wrong), "wrong-secret", parse_token(wrong)[0]),
        "revoked": (bearer(keys.revoked_admin), "revoked-key", parse_token(keys.revoked_admin)[0]),
    }
    for request_id, (headers, reason, key_id) in cases.items():
        resp = sender.send(Call("GET", f"/tests?clinic_id={CLINIC}", headers={**headers, "X-Request-ID": request_id}))
        assert resp.status == 401
        failures = [line for line in log_lines
                    if line["message"] == "authentication failed" and line.get("request_id") == request_id]
        assert len(failures) == 1, request_id
        assert failures[0]["reason"] == reason
        assert failures[0].get("key_id") == key_id
    text = json.dumps(log_lines)
    for token in keys.secrets + [wrong, unknown]:
        assert parse_token(token)[1] not in text


def test_lines_of_an_authenticated_request_carry_its_key_id(sender, keys, log_lines):
    resp = sender.send(json_call("POST", "/tests", record("logged-1"), **bearer(keys.right["ingest"]),
                                 **{"X-Request-ID": "with-key"}))
    assert resp.status == 201
    lines = [line for line in log_lines if line.get("request_id") == "with-key"]
    assert [line["message"] for line in lines] == ["committed", "request completed"]
    assert {line["key_id"] for line in lines} == {parse_token(keys.right["ingest"])[0]}


# -- RECORDS_AUTH, unavailable database ----------------------------------------------------------

def test_access_control_is_required_by_default(db_path, caplog):
    client = falcon.testing.TestClient(create_app(Settings(db_path=str(db_path))))
    assert client.simulate_get("/tests", params={"clinic_id": CLINIC}).status_code == 401
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "DISABLED" in r.message]


def test_disabled_access_control_serves_without_a_key_and_warns_at_start(db_path, caplog):
    client = falcon.testing.TestClient(create_app(Settings(db_path=str(db_path), auth="disabled")))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "RECORDS_AUTH=disabled" in r.message]
    assert len(warnings) == 1
    assert client.simulate_get("/tests", params={"clinic_id": CLINIC}).status_code == 200
    assert client.simulate_post("/tests", json=record("no-key-needed")).status_code == 201


def test_a_database_that_cannot_be_opened_is_503_for_a_keyed_request(tmp_path):
    client = falcon.testing.TestClient(create_app(Settings(db_path=str(tmp_path / "missing" / "r.db"))))
    resp = client.simulate_get("/tests", params={"clinic_id": CLINIC}, headers=bearer(unknown_token()))
    assert resp.status_code == 503 and "missing" not in resp.text
