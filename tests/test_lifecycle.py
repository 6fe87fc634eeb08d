"""GET/PUT/DELETE /tests/{test_id}, its history and /audit, through the real app factory."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta

import falcon.testing
import pytest

from records_service.store import stored_doc
from records_service.store.sqlite import migrations
from records_service.access import Principal
from records_service.app import create_app
from records_service.config import Settings
from records_service.store import VersionMismatch, open_store
from records_service.lifecycle import versions_named
from tests.old_schemas import database_at, insert_as_schema, insert_as_schemas_2_to_6
from tests.test_api import assert_problem, post


def put(client, test_id, body, if_match=None, request_id=None):
    headers = {"Content-Type": "application/json"}
    if if_match is not None:
        headers["If-Match"] = if_match
    if request_id:
        headers["X-Request-ID"] = request_id
    return client.simulate_put(f"/tests/{test_id}", body=json.dumps(body), headers=headers)


def delete(client, test_id, if_match=None, request_id=None):
    headers = {} if if_match is None else {"If-Match": if_match}
    if request_id:
        headers["X-Request-ID"] = request_id
    return client.simulate_delete(f"/tests/{test_id}", headers=headers)


def history(client, test_id):
    resp = client.simulate_get(f"/tests/{test_id}/history")
    assert resp.status_code == 200, resp.text
    return resp.json


@pytest.fixture
def created(client, record):
    """The fixture record, stored at version 1 by request `req-create`."""
    resp = post(client, record, {"X-Request-ID": "req-create"})
    assert resp.status_code == 201
    return resp.json


@pytest.fixture
def corrected(client, record, created, clock):
    """The fixture record corrected once (version 2) by request `req-correct`, a second later."""
    clock.now += timedelta(seconds=1)
    resp = put(client, "T-0001", {**record, "result": 5.9, "status": "corrected"}, '"1"', "req-correct")
    assert resp.status_code == 200, resp.text
    return resp.json


class TestRead:
    def test_get_returns_the_current_version_with_a_strong_etag(self, client, created):
        resp = client.simulate_get("/tests/T-0001")
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
        assert resp.json == created
        assert resp.headers["etag"] == '"1"'

    @pytest.mark.parametrize("path", ["/tests/T-9999", "/tests/t-0001", "/tests/_x", "/tests/bad%20id",
                                      "/tests/T-9999/history"])
    def test_a_record_that_does_not_exist_is_404(self, client, created, path):
        assert_problem(client.simulate_get(path), 404)

    def test_other_methods_are_405_with_allow(self, client, created):
        resp = client.simulate_post("/tests/T-0001")
        assert_problem(resp, 405)
        assert set(resp.headers["allow"].replace(" ", "").split(",")) >= {"GET", "PUT", "DELETE"}


class TestCorrect:
    @pytest.mark.both_engines
    def test_a_correction_stores_the_next_version_and_answers_it_with_its_etag(self, client, record, created, clock):
        clock.now += timedelta(seconds=1)
        resp = put(client, "T-0001", {**record, "result": 5.9, "status": "corrected"}, '"1"', "req-correct")
        assert resp.status_code == 200, resp.text
        assert resp.headers["etag"] == '"2"'
        assert resp.json == {**created, "result": 5.9, "status": "corrected", "version": 2,
                             "updated_at": "2025-06-01T12:00:01.123Z", "request_id": "req-correct"}
        current = client.simulate_get("/tests/T-0001")
        assert current.json == resp.json and current.headers["etag"] == '"2"'

    def test_optional_fields_left_out_become_null_and_status_final(self, client, record, created):
        required = {k: record[k] for k in ("test_id", "clinic_id", "patient_id", "test_type", "result", "collected_at")}
        body = put(client, "T-0001", required, '"1"').json
        assert (body["unit"], body["status"], body["notes"], body["version"]) == (None, "final", None, 2)

    @pytest.mark.parametrize("if_match", [None, "", "  "])
    def test_without_if_match_is_428_and_nothing_changes(self, client, record, created, if_match):
        assert_problem(put(client, "T-0001", {**record, "result": 1}, if_match), 428)
        assert history(client, "T-0001") == [created]

    @pytest.mark.parametrize("if_match", [
        '"1"',          # stale: the version before the current one
        '"3"',          # a version that does not exist yet
        'W/"2"',        # weak tags never match: If-Match compares strongly
        "*",            # would skip the check the header exists for
        "2",            # not a quoted entity-tag
        '"02"',         # another tag than the one the service gave
        '"2" junk',     # malformed
        '"abc"',
        '"1", W/"2"',
    ])
    def test_a_value_that_does_not_name_the_current_version_is_412_and_nothing_changes(
            self, client, record, corrected, if_match):
        assert_problem(put(client, "T-0001", {**record, "result": 7.7}, if_match), 412)
        assert history(client, "T-0001")[-1] == corrected
        assert client.simulate_get("/tests/T-0001").json == corrected

    @pytest.mark.parametrize("if_match, says", [
        ("2", 'If-Match: "2", not 2'),
        ("1, 2", 'If-Match: "1", not 1'),
        ("*", "If-Match: * is not accepted"),
        ('W/"2"', 'a weak tag (W/"2") never matches'),
        ("v2", "a quoted version"),
        ('"1"', "read the record again, then retry"),  # well formed, only stale
    ])
    def test_a_412_says_how_to_write_if_match_when_its_form_names_no_version(
            self, client, record, corrected, if_match, says):
        body = assert_problem(put(client, "T-0001", {**record, "result": 7.7}, if_match), 412)
        assert says in body["detail"]
        assert says in assert_problem(delete(client, "T-0001", if_match), 412)["detail"]

    @pytest.mark.parametrize("if_match", ['"2"', ' "2" ', '"1", "2"', 'W/"1", "2"', '"x,y", "2"'])
    def test_a_strong_tag_naming_the_current_version_matches_alone_or_in_a_list(
            self, client, record, corrected, if_match):
        resp = put(client, "T-0001", {**record, "result": 7.7}, if_match)
        assert resp.status_code == 200 and resp.json["version"] == 3

    @pytest.mark.parametrize("field, value", [("test_id", "T-0002"), ("clinic_id", "C002"), ("patient_id", "P-43")])
    def test_an_identity_field_cannot_change(self, client, record, created, field, value):
        body = assert_problem(put(client, "T-0001", {**record, field: value}, '"1"'), 400)
        assert [e["field"] for e in body["errors"]] == [field]
        assert history(client, "T-0001") == [created]

    def test_every_failing_field_is_reported_at_once(self, client, record, created):
        body = assert_problem(put(client, "T-0001", {**record, "clinic_id": "C002", "patient_id": "bad id",
                                                     "result": True, "colour": "red"}, '"1"'), 400)
        assert sorted(e["field"] for e in body["errors"]) == ["clinic_id", "colour", "patient_id", "result"]

    def test_the_service_status_cannot_be_sent(self, client, record, created):
        body = assert_problem(put(client, "T-0001", {**record, "status": "entered-in-error"}, '"1"'), 400)
        assert [e["field"] for e in body["errors"]] == ["status"]

    @pytest.mark.parametrize("raw, status", [(b"{", 400), (b"[]", 400), (b'{"result": NaN}', 400)])
    def test_a_malformed_body_is_refused_like_post(self, client, created, raw, status):
        resp = client.simulate_put("/tests/T-0001", body=raw, headers={"Content-Type": "application/json",
                                                                       "If-Match": '"1"'})
        assert_problem(resp, status)

    def test_a_body_that_is_not_json_is_415(self, client, record, created):
        resp = client.simulate_put("/tests/T-0001", body=json.dumps(record),
                                    headers={"Content-Type": "text/plain", "If-Match": '"1"'})
        assert_problem(resp, 415)

    def test_a_record_that_does_not_exist_is_404_before_anything_else(self, client, record):
        assert_problem(put(client, "T-0001", record, None), 404)

    @pytest.mark.both_engines
    def test_a_corrected_record_keeps_its_place_in_the_list(self, client, record, created):
        post(client, {**record, "test_id": "T-0002"})
        put(client, "T-0001", {**record, "result": 6.1}, '"1"')
        listed = client.simulate_get("/tests", params={"clinic_id": "C001"}).json
        assert [(r["test_id"], r["version"], r["result"]) for r in listed] == [("T-0001", 2, 6.1), ("T-0002", 1, 5.4)]

    @pytest.mark.both_engines
    def test_export_and_stats_show_current_versions_of_corrected_and_voided_records(self, client, record, created):
        kept = post(client, {**record, "test_id": "T-0002"}).json
        post(client, {**record, "test_id": "T-0003", "test_type": "LDL"})
        corrected = put(client, "T-0001", {**record, "test_type": "CBC", "status": "corrected"}, '"1"').json
        voided = delete(client, "T-0003", '"1"').json
        export = client.simulate_get("/tests/_export", params={"clinic_id": "C001"}).text
        assert [json.loads(line) for line in export.splitlines()] == [corrected, kept, voided]
        stats = client.simulate_get("/tests/_stats", params={"clinic_id": "C001"}).json
        assert (stats["total"], stats["by_test_type"], stats["by_status"]) == (
            3, {"CBC": 1, "HbA1c": 1, "LDL": 1}, {"corrected": 1, "entered-in-error": 1, "final": 1})


class TestVoid:
    @pytest.mark.both_engines
    def test_delete_stores_a_version_entered_in_error_and_keeps_everything(self, client, created, corrected, clock):
        clock.now += timedelta(seconds=1)
        resp = delete(client, "T-0001", '"2"', "req-void")
        assert resp.status_code == 200, resp.text
        assert resp.headers["etag"] == '"3"'
        assert resp.json == {**corrected, "status": "entered-in-error", "version": 3,
                             "updated_at": "2025-06-01T12:00:02.123Z", "request_id": "req-void"}
        assert client.simulate_get("/tests/T-0001").json == resp.json
        assert history(client, "T-0001") == [created, corrected, resp.json]
        assert client.simulate_get("/tests", params={"clinic_id": "C001"}).json == [resp.json]

    def test_delete_without_if_match_is_428(self, client, created):
        assert_problem(delete(client, "T-0001"), 428)
        assert history(client, "T-0001") == [created]

    @pytest.mark.parametrize("if_match", ['"1"', "*", 'W/"2"'])
    def test_delete_with_a_value_not_naming_the_current_version_is_412(self, client, corrected, if_match):
        assert_problem(delete(client, "T-0001", if_match), 412)
        assert client.simulate_get("/tests/T-0001").json == corrected

    def test_delete_of_a_missing_record_is_404(self, client):
        assert_problem(delete(client, "T-0404", '"1"'), 404)

    @pytest.mark.both_engines
    def test_voiding_a_voided_record_again_is_409_and_changes_nothing(self, client, created):
        voided = delete(client, "T-0001", '"1"').json
        body = assert_problem(delete(client, "T-0001", '"2"'), 409)
        assert body["type"].endswith("already-voided")
        assert history(client, "T-0001") == [created, voided]

    @pytest.mark.both_engines
    def test_a_voided_record_can_be_corrected_back(self, client, record, created):
        delete(client, "T-0001", '"1"', "req-void")
        resp = put(client, "T-0001", {**record, "status": "corrected"}, '"2"', "req-restore")
        assert resp.status_code == 200 and resp.json["version"] == 3 and resp.json["status"] == "corrected"
        assert client.simulate_get("/audit/req-restore").json[0]["action"] == "correct"


class TestHistoryAndAudit:
    @pytest.mark.both_engines
    def test_history_is_every_version_oldest_first_each_as_it_was(self, client, record, created, corrected):
        third = put(client, "T-0001", {**record, "unit": "mmol/mol", "result": 41}, '"2"', "req-3").json
        assert history(client, "T-0001") == [created, corrected, third]
        assert [(v["version"], v["request_id"]) for v in [created, corrected, third]] == [
            (1, "req-create"), (2, "req-correct"), (3, "req-3")]

    @pytest.mark.both_engines
    def test_audit_lists_what_each_request_wrote(self, client, created, corrected):
        for request_id, version, action, at in [("req-create", 1, "create", created["updated_at"]),
                                                ("req-correct", 2, "correct", corrected["updated_at"])]:
            resp = client.simulate_get(f"/audit/{request_id}")
            assert resp.status_code == 200
            assert resp.json == [{"test_id": "T-0001", "version": version, "action": action, "at": at,
                                  "clinic_id": "C001", "key_id": None}]
        delete(client, "T-0001", '"2"', "req-void")
        assert client.simulate_get("/audit/req-void").json == [
            {"test_id": "T-0001", "version": 3, "action": "void", "at": "2025-06-01T12:00:01.123Z",
             "clinic_id": "C001", "key_id": None}]

    def test_audit_of_a_request_that_wrote_nothing_is_an_empty_list(self, client, created):
        client.simulate_get("/tests/T-0001", headers={"X-Request-ID": "req-read"})
        for request_id in ("req-read", "never-seen", "has%20space"):
            resp = client.simulate_get(f"/audit/{request_id}")
            assert resp.status_code == 200 and resp.json == []

    @pytest.mark.both_engines
    def test_audit_lists_a_requests_writes_in_the_order_it_made_them(self, settings, record):
        store = open_store(settings)
        batch = [{**record, "test_id": test_id, "clinic_id": clinic_id}  # one request, several clinics
                 for test_id, clinic_id in (("Z", "C9"), ("A", "C001"), ("M", "C5"), ("B", "C001"))]
        store.insert_batch(batch, request_id="req-batch", key_id="k1", now="2025-06-01T12:00:00.000Z", atomic=False)
        assert [(w["test_id"], w["clinic_id"], w["key_id"]) for w in store.audit("req-batch")] == [
            ("Z", "C9", "k1"), ("A", "C001", "k1"), ("M", "C5", "k1"), ("B", "C001", "k1")]


class AsPrincipal:
    """Stands in for authentication: every request is made by `principal`."""

    def __init__(self, principal: Principal) -> None:
        self._principal = principal

    def process_request(self, req, resp) -> None:
        req.context.principal = self._principal


class TestAnotherClinicsRecord:
    @pytest.fixture
    def outsider(self, settings, clock, created, corrected):
        app = create_app(settings, clock=clock)
        app.add_middleware(AsPrincipal(Principal("k1", frozenset({"read", "ingest"}), frozenset({"C002"}))))
        return falcon.testing.TestClient(app)

    @pytest.mark.parametrize("method, path, headers, body", [
        ("GET", "/tests/{}", {}, None),
        ("GET", "/tests/{}/history", {}, None),
        ("PUT", "/tests/{}", {"If-Match": '"2"', "Content-Type": "application/json"}, "record"),
        ("PUT", "/tests/{}", {}, "record"),
        ("DELETE", "/tests/{}", {"If-Match": '"2"'}, None),
        ("DELETE", "/tests/{}", {}, None),
    ])
    def test_is_404_exactly_as_a_missing_record(self, client, outsider, record, corrected, method, path, headers, body):
        def ask(test_id):
            data = json.dumps({**record, "test_id": test_id}) if body else None
            resp = outsider.simulate_request(method, path.format(test_id), headers={**headers, "X-Request-ID": "r"},
                                             body=data)
            return resp.status_code, resp.headers.get("content-type"), resp.json

        assert ask("T-0001") == ask("T-0404")
        assert ask("T-0001")[0] == 404
        assert client.simulate_get("/tests/T-0001").json == corrected

    def test_audit_shows_only_the_clinics_the_key_sees(self, outsider):
        assert outsider.simulate_get("/audit/req-correct").json == []


@pytest.mark.both_engines
class TestStoreConcurrency:
    def test_of_two_writers_that_read_the_same_version_exactly_one_succeeds(self, settings, record, created):
        first, second = open_store(settings), open_store(settings)  # two connections, as two workers
        assert first.current("T-0001").version == second.current("T-0001").version == 1
        won = first.correct({**record, "result": 1.0}, expected=frozenset({1}), request_id="a", now="2025-06-01T12:00:01.000Z")
        with pytest.raises(VersionMismatch) as lost:
            second.correct({**record, "result": 2.0}, expected=frozenset({1}), request_id="b",
                           now="2025-06-01T12:00:01.000Z")
        assert lost.value.current == 2
        rows, count = second.history_json("T-0001")
        assert count == 2 and json.loads(rows)[-1] == json.loads(won.doc)


@pytest.mark.both_engines
class TestTriggers:
    """History is kept by the database itself, whatever code creates or changes a record."""

    def test_a_new_version_written_by_any_code_path_keeps_the_one_it_supersedes(self, client, raw_db, created):
        # Not through the store: plain SQL, as a script or a future code path might change a record.
        doc = json.loads(raw_db.execute("SELECT doc FROM records WHERE test_id = 'T-0001'")[0][0])
        doc.update(version=2, result=9, updated_at="2025-06-02T00:00:00.000Z", request_id="req-script")
        raw_db.execute("UPDATE records SET version = 2, request_id = 'req-script', doc = ? WHERE test_id = 'T-0001'",
                     (json.dumps(doc),))
        assert [(v["version"], v["request_id"]) for v in history(client, "T-0001")] == [
            (1, "req-create"), (2, "req-script")]
        assert history(client, "T-0001")[0] == created

    @pytest.mark.parametrize("sql", [
        "DELETE FROM records",
        "UPDATE records SET doc = '{}'",                        # a change that is not a new version
        "UPDATE records SET version = version + 2",             # a gap in the versions
        "UPDATE records SET version = version + 1, clinic_id = 'C9'",
        "UPDATE records SET version = version + 1, seq = seq + 100",
        "DELETE FROM record_versions",
        "UPDATE record_versions SET doc = '{}'",
    ])
    def test_records_are_never_deleted_and_versions_never_rewritten(self, client, raw_db, created, corrected, sql):
        assert raw_db.execute("SELECT count(*) FROM record_versions")[0][0] == 1  # version 1, superseded
        with pytest.raises(raw_db.refused):
            raw_db.execute(sql)
        assert history(client, "T-0001") == [created, corrected]
        assert client.simulate_get("/tests/T-0001").json == corrected


@pytest.mark.sqlite_only(reason="migrations of SQLite schemas shipped before PostgreSQL was supported")
class TestMigration:
    def test_existing_records_become_version_1_with_their_original_request_id(self, tmp_path, record, clock):
        path = str(tmp_path / "old.db")
        conn = database_at(path, 2)  # the schema before this migration
        assert "record_versions" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        conn.execute("BEGIN")
        old = [json.loads(insert_as_schemas_2_to_6(conn, {**record, "test_id": f"old-{i}"}, f"req-old-{i}",
                                                   f"2025-01-0{i + 1}T00:00:00.000Z")) for i in range(3)]
        conn.execute("COMMIT")
        conn.close()

        client = falcon.testing.TestClient(create_app(Settings(db_path=path, auth="disabled"), clock=clock))
        schema = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
        assert schema == migrations.SCHEMA_VERSION
        for i, doc in enumerate(old):
            assert history(client, f"old-{i}") == [doc]
            assert client.simulate_get(f"/audit/req-old-{i}").json == [
                {"test_id": f"old-{i}", "version": 1, "action": "create", "at": doc["updated_at"],
                 "clinic_id": "C001", "key_id": None}]
        # The migrated records go on like any other.
        resp = put(client, "old-1", {**record, "test_id": "old-1", "result": 1}, '"1"', "req-new")
        assert resp.json["version"] == 2 and resp.json["created_at"] == old[1]["created_at"]
        assert [v["version"] for v in history(client, "old-1")] == [1, 2]

    def test_from_schema_5_history_and_audit_read_the_same_and_history_goes_on(self, tmp_path, record, clock,
                                                                             monkeypatch):
        """Schema 6 keeps a version in history when it is superseded; schema 5 copied every version
        when it was written. Those copies stay, and are neither listed twice nor copied again."""
        settings = Settings(db_path=str(tmp_path / "v5.db"), auth="disabled")

        def audit(client, request_id):
            return [(w["test_id"], w["version"], w["action"]) for w in client.simulate_get(f"/audit/{request_id}").json]

        # A schema-5 file as schema 5's code left it: its triggers copied every version into
        # history when it was written (records_keep_created, records_keep_changed).
        conn = database_at(settings.db_path, 5)
        a1 = json.loads(insert_as_schema(5, conn, {**record, "test_id": "A"}, "req-a", "2025-06-01T12:00:00.123Z"))
        b1 = json.loads(insert_as_schema(5, conn, {**record, "test_id": "B"}, "req-b", "2025-06-01T12:00:00.123Z"))
        versions = [b1]
        for version, request_id, change in ((2, "req-b2", {"result": 2}), (3, "req-b3", {"status": "entered-in-error"})):
            fields = {k: v for k, v in versions[-1].items()
                      if k not in ("created_at", "updated_at", "version", "request_id")}
            doc = json.loads(stored_doc({**fields, **change}, created_at=b1["created_at"],
                                        updated_at="2025-06-01T12:00:01.123Z", version=version, request_id=request_id))
            conn.execute("UPDATE records SET version = ?, status = ?, updated_at = ?, request_id = ?, doc = ?"
                         " WHERE test_id = 'B'", (version, doc["status"], doc["updated_at"], request_id, json.dumps(doc)))
            versions.append(doc)
        b2, b3 = versions[1:]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
        assert conn.execute("SELECT count(*) FROM record_versions").fetchone()[0] == 4

        client = falcon.testing.TestClient(create_app(settings, clock=clock))
        assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.SCHEMA_VERSION
        assert history(client, "A") == [a1]
        assert history(client, "B") == [b1, b2, b3]
        assert [audit(client, r) for r in ("req-a", "req-b", "req-b2", "req-b3")] == [
            [("A", 1, "create")], [("B", 1, "create")], [("B", 2, "correct")], [("B", 3, "void")]]

        a2 = put(client, "A", {**record, "test_id": "A", "result": 3}, '"1"', "req-a2").json
        c1 = post(client, {**record, "test_id": "C"}, {"X-Request-ID": "req-c"}).json
        assert history(client, "A") == [a1, a2] and history(client, "C") == [c1]
        assert audit(client, "req-a") == [("A", 1, "create")] and audit(client, "req-a2") == [("A", 2, "correct")]
        assert conn.execute("SELECT count(*) FROM record_versions").fetchone()[0] == 4, \
            "A's version 1 was copied again, or C's current version was copied"
        conn.close()


@pytest.mark.parametrize("value, versions", [
    (None, None), ("", None), (" \t", None),
    ('"1"', {1}), ('"1", "22"', {1, 22}), ('W/"1", "2"', {2}), ('"1",,"2"', {1, 2}), ('"a,b", "3"', {3}),
    ("*", set()), ('W/"1"', set()), ("1", set()), ('"01"', set()), ('"0"', set()), ('"-1"', set()),
    ('"1" "2"', set()), ('"1', set()), ('""', set()), ('"1" x', set()), ('"1"; "2"', set()),
])
def test_if_match_values_and_the_versions_they_name(value, versions):
    named = versions_named(value)
    assert named == (None if versions is None else frozenset(versions))
