"""POST /tests and GET /tests through the real app factory, with a temporary database."""

from __future__ import annotations

import io
import json
import uuid

import falcon.testing
import pytest

from records_service.app import create_app
from records_service.config import Settings

JSON_HEADERS = {"Content-Type": "application/json"}


def post(client, body, headers=None):
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    return client.simulate_post("/tests", body=body, headers={**JSON_HEADERS, **(headers or {})})


def assert_problem(resp, status):
    """Every error is problem+json with the RFC 9457 members and the request ID of the response."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body = resp.json
    assert body["status"] == status
    assert body["type"] and body["title"] and body["detail"]
    assert body["request_id"] == resp.headers["x-request-id"]
    return body


@pytest.mark.both_engines
def test_post_stores_and_returns_the_record(client, record, clock):
    resp = post(client, record, {"X-Request-ID": "req-1"})
    assert resp.status_code == 201
    assert resp.headers["location"] == "/tests/T-0001"
    assert resp.headers["content-type"] == "application/json"
    assert resp.json == {
        **record, "collected_at": "2025-05-01T04:30:00Z",
        "created_at": "2025-06-01T12:00:00.123Z", "updated_at": "2025-06-01T12:00:00.123Z",
        "version": 1, "request_id": "req-1",
    }


def test_optional_fields_come_back_null_and_status_defaults_to_final(client, record):
    minimal = {k: record[k] for k in ("test_id", "clinic_id", "patient_id", "test_type", "result", "collected_at")}
    body = post(client, minimal).json
    assert (body["unit"], body["status"], body["notes"]) == (None, "final", None)


@pytest.mark.both_engines
def test_get_lists_the_clinics_records_oldest_first(client, record):
    for i in range(3):
        assert post(client, {**record, "test_id": f"T{i}"}).status_code == 201
    assert post(client, {**record, "test_id": "other", "clinic_id": "C002"}).status_code == 201
    resp = client.simulate_get("/tests", params={"clinic_id": "C001"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert [r["test_id"] for r in resp.json] == ["T0", "T1", "T2"]


def test_get_for_a_clinic_without_records_is_an_empty_array(client):
    resp = client.simulate_get("/tests", params={"clinic_id": "C999"})
    assert resp.status_code == 200 and resp.json == []


@pytest.mark.parametrize("query, parameter", [
    ("", "clinic_id"),
    ("clinic_id=", "clinic_id"),
    ("clinic_id=C%231", "clinic_id"),
    ("clinic_id=_x", "clinic_id"),
    ("clinic_id=C1&clinic_id=C2", "clinic_id"),
    ("clinic_id=C1&colour=red", "colour"),
])
def test_get_rejects_bad_parameters_naming_them(client, query, parameter):
    body = assert_problem(client.simulate_get("/tests", query_string=query), 400)
    assert [e["field"] for e in body["errors"]] == [parameter]


@pytest.mark.both_engines
def test_a_retry_of_the_same_record_is_409_identical_and_changes_nothing(client, record):
    first = post(client, record).json
    # The same instant in another offset, and the default status left out: still the same record.
    retry = {**record, "collected_at": "2025-05-01T04:30:00Z"}
    del retry["status"]
    body = assert_problem(post(client, retry), 409)
    assert body["identical"] is True
    assert client.simulate_get("/tests", params={"clinic_id": "C001"}).json == [first]


@pytest.mark.both_engines
def test_a_different_record_with_a_taken_test_id_is_409_not_identical(client, record):
    first = post(client, record).json
    body = assert_problem(post(client, {**record, "result": 9.9}), 409)
    assert body["identical"] is False
    assert client.simulate_get("/tests", params={"clinic_id": "C001"}).json == [first]


def test_an_invalid_record_is_400_naming_every_field(client, record):
    body = assert_problem(post(client, {**record, "result": True, "clinic_id": "", "status": "done", "x": 1}), 400)
    assert sorted(e["field"] for e in body["errors"]) == ["clinic_id", "result", "status", "x"]
    assert all(e["message"] for e in body["errors"])


@pytest.mark.parametrize("raw", [
    b'{"test_id": "a", "test_id": "b"}', b'{"result": NaN}', b'{"result": Infinity}', b"[]", b'"x"', b"null",
])
def test_duplicate_keys_non_finite_numbers_and_non_objects_are_400(client, raw):
    assert_problem(post(client, raw), 400)


@pytest.mark.parametrize("result", [b"1e-400", b"0." + b"0" * 1_000_000 + b"1"])
def test_a_number_that_would_be_stored_as_zero_is_400_naming_result(client, record, result):
    raw = json.dumps({**record, "result": "RESULT"}).encode().replace(b'"RESULT"', result)
    body = assert_problem(post(client, raw), 400)
    assert [e["field"] for e in body["errors"]] == ["result"]
    assert client.simulate_get(f"/tests/{record['test_id']}").status_code == 404


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff", b"[" * 100_000, b'{"a":' * 100_000, b"9" * 10_000])
def test_malformed_or_hostile_json_is_400_not_a_crash(client, raw):
    body = assert_problem(post(client, raw), 400)
    assert body["type"].endswith("malformed-json")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"])
def test_a_body_that_is_not_declared_json_is_415(client, record, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    resp = client.simulate_post("/tests", body=json.dumps(record), headers=headers)
    assert_problem(resp, 415)


def test_content_type_parameters_are_accepted(client, record):
    assert post(client, record, {"Content-Type": "application/json; charset=utf-8"}).status_code == 201


def test_a_body_over_the_limit_is_413_without_being_read(tmp_path, record):
    app = create_app(Settings(db_path=str(tmp_path / "r.db"), max_body_bytes=100, auth="disabled"))

    class Unreadable(io.RawIOBase):
        def readinto(self, buffer):
            raise AssertionError("the body was read although its declared length is over the limit")

    resp = falcon.testing.TestClient(app).simulate_post(
        "/tests", headers={**JSON_HEADERS, "Content-Length": "5000"}, extras={"wsgi.input": Unreadable()})
    assert_problem(resp, 413)


def test_a_body_at_the_limit_is_accepted_and_one_byte_more_is_413(tmp_path, record, clock):
    body = json.dumps(record).encode()
    app = create_app(Settings(db_path=str(tmp_path / "r.db"), max_body_bytes=len(body), auth="disabled"), clock=clock)
    client = falcon.testing.TestClient(app)
    assert post(client, body).status_code == 201
    assert_problem(post(client, body + b" "), 413)


def test_unknown_paths_are_404_problems(client):
    assert_problem(client.simulate_get("/nowhere"), 404)


@pytest.mark.parametrize("path", [
    "/", "/health", "/ready", "/openapi.json", "/tests?clinic_id=C001", "/tests/_export?clinic_id=C001",
    "/tests/_stats?clinic_id=C001", "/tests/T-0001", "/tests/T-0001/history", "/audit/first", "/tests?clinic_id=a%20b",
    "/tests/nope", "/tests/nope/history",
])
def test_every_get_route_answers_head_with_the_same_status_and_headers_and_no_body(client, record, path):
    assert post(client, record, {"X-Request-ID": "first"}).status_code == 201
    path, _, query = path.partition("?")
    get = client.simulate_get(path, query_string=query)
    head = client.simulate_head(path, query_string=query)
    volatile = {"x-request-id", "server-timing"}
    assert head.status_code == get.status_code
    assert {k: v for k, v in head.headers.items() if k not in volatile} == \
        {k: v for k, v in get.headers.items() if k not in volatile}
    assert head.content == b""


@pytest.mark.parametrize("path", ["/", "/health", "/ready", "/openapi.json", "/tests", "/tests/_batch",
                                  "/tests/_export", "/tests/_stats", "/tests/T-1", "/tests/T-1/history", "/audit/r"])
def test_options_and_a_405_list_the_same_methods_in_allow(client, path):
    options = client.simulate_options(path)
    refused = client.simulate_request("PATCH", path)
    assert options.status_code == 200 and refused.status_code == 405
    assert options.headers["allow"] == refused.headers["allow"]
    assert "OPTIONS" in options.headers["allow"].split(", ")


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
def test_unsupported_methods_are_405_with_allow(client, method):
    resp = client.simulate_request(method, "/tests")
    assert_problem(resp, 405)
    assert set(resp.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


@pytest.mark.both_engines
def test_a_500_reveals_nothing_but_the_request_id(settings, record, caplog):
    def broken_clock():
        raise RuntimeError("/var/lib/secret.db: SELECT * FROM records")

    client = falcon.testing.TestClient(create_app(settings, clock=broken_clock))
    resp = post(client, record)
    body = assert_problem(resp, 500)
    assert set(body) == {"type", "title", "status", "detail", "request_id"}
    assert "secret" not in resp.text and "SELECT" not in resp.text and "Traceback" not in resp.text
    # The traceback is in the logs instead, under the same request ID.
    assert any(r.exc_info and "SELECT" in str(r.exc_info[1]) for r in caplog.records)


def test_a_database_that_cannot_be_opened_is_503_not_500(tmp_path, record):
    client = falcon.testing.TestClient(create_app(Settings(db_path=str(tmp_path / "missing" / "r.db"), auth="disabled")))
    assert client.simulate_get("/health").status_code == 200
    resp = post(client, record)
    assert_problem(resp, 503)
    assert "missing" not in resp.text
    assert resp.headers["retry-after"]


class TestRequestId:
    def test_a_well_formed_client_id_is_kept(self, client):
        resp = client.simulate_get("/tests", params={"clinic_id": "C1"}, headers={"X-Request-ID": "abc.DEF_1-2"})
        assert resp.headers["x-request-id"] == "abc.DEF_1-2"

    @pytest.mark.parametrize("given", ["", "has space", "x" * 129, "semi;colon", "ünï"])
    def test_a_malformed_client_id_is_replaced_by_a_uuid4(self, client, given):
        resp = client.simulate_get("/tests", params={"clinic_id": "C1"}, headers={"X-Request-ID": given})
        assert uuid.UUID(resp.headers["x-request-id"]).version == 4

    def test_errors_carry_the_same_id_in_header_and_body(self, client):
        resp = client.simulate_get("/nowhere", headers={"X-Request-ID": "trace-me"})
        assert resp.headers["x-request-id"] == "trace-me" and resp.json["request_id"] == "trace-me"

    def test_every_response_carries_server_timing(self, client, record):
        for resp in (post(client, record), client.simulate_get("/nowhere"), client.simulate_get("/health")):
            assert resp.headers["server-timing"].startswith("app;dur=")
