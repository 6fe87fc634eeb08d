"""The OpenAPI document is true: well formed, the same routes as Falcon serves, and live responses fit it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import falcon.inspect
import jsonschema_rs
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from records_service.app import create_app
from records_service.config import Settings
from tests.live import REPO

DOCUMENT = json.loads((REPO / "records_service" / "openapi.json").read_text())
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
OPEN_PATHS = {"/health", "/ready", "/openapi.json"}  # served without an API key
ST = str(Path(sys.executable).with_name("st"))
# No 5xx, and every response fits the document. Not negative_data_rejection: with RECORDS_AUTH=disabled
# a request without the documented Authorization header is served, which that check calls accepting
# invalid data; nor the auth checks, for the same reason.
SCHEMATHESIS_CHECKS = ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
    "response_schema_conformance", "unsupported_method", "allow_header_conformance",
])


def documented_operations(document: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item
            if method in HTTP_METHODS}


def served_operations(app: falcon.App) -> set[tuple[str, str]]:
    """Every (method, route) that reaches a responder of ours; Falcon's own 405/OPTIONS ones do not count."""
    return {(method.method, route.path) for route in falcon.inspect.inspect_app(app).routes
            for method in route.methods if not method.internal}


def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield f"{method.upper()} {path}", path, operation


def resolve(document: dict, node):
    while isinstance(node, dict) and "$ref" in node:
        target = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def test_every_route_falcon_serves_is_documented_and_every_documented_route_is_served(tmp_path):
    served = served_operations(create_app(Settings(db_path=str(tmp_path / "r.db"), auth="disabled")))
    documented = documented_operations(DOCUMENT)

    def listing(operations: set) -> str:
        return "\n".join(f"    {method} {path}" for method, path in sorted(operations, key=lambda o: (o[1], o[0]))) \
            or "    (none)"

    assert served == documented, (
        f"served but not documented:\n{listing(served - documented)}\n"
        f"documented but not served:\n{listing(documented - served)}")


def test_the_document_is_valid_openapi_3_1_and_every_reference_resolves():
    assert DOCUMENT["openapi"].startswith("3.1")
    assert [str(e) for e in OPENAPI_31_VALIDATOR.iter_errors(DOCUMENT)] == []
    for name, schema in DOCUMENT["components"]["schemas"].items():
        jsonschema_rs.meta.validate(schema)

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(DOCUMENT, node)  # a KeyError names the reference that does not resolve
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(DOCUMENT)


def test_every_response_documents_the_headers_and_error_shape_every_response_has():
    for name, path, operation in operations(DOCUMENT):
        for status, response in operation["responses"].items():
            response = resolve(DOCUMENT, response)
            headers = response.get("headers", {})
            where = f"{name} {status}"
            assert {"X-Request-ID", "Server-Timing"} <= headers.keys(), where
            if status == "401":
                assert "WWW-Authenticate" in headers, where
            content = response.get("content", {})
            if int(status) >= 400 and "text/html" not in content:
                assert list(content) == ["application/problem+json"], where
                schema = resolve(DOCUMENT, content["application/problem+json"]["schema"])
                required = set(schema.get("required", [])) | {
                    r for part in schema.get("allOf", []) for r in resolve(DOCUMENT, part).get("required", [])}
                assert {"type", "title", "status", "detail", "request_id"} <= required, where
                if status == "503":
                    assert "Retry-After" in headers, where


def test_only_health_ready_and_the_document_are_open_and_every_other_operation_can_refuse():
    for name, path, operation in operations(DOCUMENT):
        if path in OPEN_PATHS:
            assert operation["security"] == [] and "401" not in operation["responses"], name
        else:
            assert operation.get("security", DOCUMENT["security"]), name
            assert {"401", "403"} <= operation["responses"].keys(), name
        assert {"500"} <= operation["responses"].keys(), name
    assert {s for op in DOCUMENT["paths"]["/"].values() for r in op["security"] for s in r} == {"basicAuth", "bearerAuth"}


def test_schemathesis_finds_no_server_error_and_no_response_that_breaks_the_document(start_server, tmp_path):
    """Every documented operation this build serves, against real gunicorn (auth off), bounded in examples."""
    server = start_server(workers=2)
    served = served_operations(create_app(Settings(db_path=str(tmp_path / "probe.db"), auth="disabled")))
    paths = {}
    for path, item in DOCUMENT["paths"].items():
        kept = {key: value for key, value in item.items() if key not in HTTP_METHODS or (key.upper(), path) in served}
        if kept.keys() & HTTP_METHODS:
            paths[path] = kept
    if not paths:
        pytest.fail("no documented operation is served")
    schema_file = tmp_path / "openapi.json"
    schema_file.write_text(json.dumps({**DOCUMENT, "paths": paths}))

    out = subprocess.run(
        [ST, "run", str(schema_file), "--url", f"http://127.0.0.1:{server.port}", "--checks", SCHEMATHESIS_CHECKS,
         "--max-examples", "25", "--seed", "20250601", "--request-timeout", "10", "--workers", "1",
         "--suppress-health-check", "all", "--no-color"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    tested = sum(1 for item in paths.values() for key in item if key in HTTP_METHODS)
    assert f"Tested: {tested}" in out.stdout, out.stdout[-3000:]
