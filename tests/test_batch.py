"""POST /tests/_batch: NDJSON and JSON arrays, per-record outcomes, atomic batches, limits."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import falcon.testing
import pytest

from records_service.access import Principal
from records_service.app import create_app
from records_service.collection import MAX_BATCH_RECORDS, _triage
from records_service.config import Settings
from tests.test_api import assert_problem, post
from tests.test_listing import NDJSON, ids, make

JSON_HEADERS = {"Content-Type": "application/json"}


def ndjson(records) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n"


def batch(client, body, content_type="application/x-ndjson", query=""):
    return client.simulate_post("/tests/_batch", body=body, query_string=query, headers={"Content-Type": content_type})


def listed(client, clinic_id="C001") -> list[str]:
    return ids(client.simulate_get("/tests", params={"clinic_id": clinic_id, "limit": "1000"}))


@pytest.mark.parametrize("content_type, encode", [
    ("application/x-ndjson", ndjson),
    ("application/x-ndjson; charset=utf-8", ndjson),
    ("application/json", json.dumps),
])
def test_a_good_batch_stores_every_record_in_body_order(client, content_type, encode, record, clock):
    records = [{**record, "test_id": f"b{i}"} for i in (3, 1, 2)]
    resp = batch(client, encode(records), content_type)
    assert resp.status_code == 200, resp.text
    assert resp.json == {"received": 3, "created": 3, "failed": []}
    assert listed(client) == ["b3", "b1", "b2"]
    stored = client.simulate_get("/tests", params={"clinic_id": "C001"}).json[0]
    # Stored exactly as POST /tests stores a record, with the batch's request ID.
    assert stored == {**record, "test_id": "b3", "collected_at": "2025-05-01T04:30:00Z",
                      "created_at": "2025-06-01T12:00:00.123Z", "updated_at": "2025-06-01T12:00:00.123Z",
                      "version": 1, "request_id": resp.headers["x-request-id"]}


@pytest.mark.both_engines
def test_each_record_is_judged_on_its_own_with_what_post_tests_would_say(client, record):
    assert post(client, {**record, "test_id": "stored"}).status_code == 201
    body = "\n".join([
        json.dumps({**record, "test_id": "ok-0"}),
        '{"test_id": "broken", ',                                    # 1: not JSON
        "",                                                          # blank lines are not records
        "[1, 2]",                                                    # 2: not an object
        json.dumps({**record, "test_id": "bad-1", "result": True, "status": "done"}),  # 3: invalid
        json.dumps({**record, "test_id": "stored"}),                 # 4: exists, same record
        json.dumps({**record, "test_id": "stored", "result": 9}),    # 5: exists, different
        json.dumps({**record, "test_id": "ok-0", "collected_at": "2025-05-01T04:30:00Z"}),  # 6: repeat, identical
        json.dumps({**record, "test_id": "ok-0", "result": 2}),      # 7: repeat, different
        json.dumps({**record, "test_id": "x y"}),                    # 8: an id that is not one
        "  ",
        json.dumps({**record, "test_id": "ok-1"}),                   # 9
    ])
    resp = batch(client, body)
    assert resp.status_code == 200, resp.text
    out = resp.json
    assert (out["received"], out["created"]) == (10, 2)
    failed = {f["index"]: f for f in out["failed"]}
    assert [f["index"] for f in out["failed"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert {i: (f["test_id"], f["status"]) for i, f in failed.items()} == {
        1: (None, 400), 2: (None, 400), 3: ("bad-1", 400), 4: ("stored", 409), 5: ("stored", 409),
        6: ("ok-0", 409), 7: ("ok-0", 409), 8: (None, 400)}
    assert failed[1]["type"].endswith("malformed-json")
    assert failed[2]["errors"] == [{"field": None, "message": "the record must be a JSON object"}]
    assert sorted(e["field"] for e in failed[3]["errors"]) == ["result", "status"]
    assert [failed[i]["identical"] for i in (4, 5, 6, 7)] == [True, False, True, False]
    assert all(f["detail"] and f["type"] for f in out["failed"])
    assert listed(client) == ["stored", "ok-0", "ok-1"]


def test_a_repeat_is_compared_with_the_first_occurrence_not_the_stored_one(client, record):
    resp = batch(client, json.dumps([{**record, "result": 1}, {**record, "result": 2}, {**record, "result": 1}]),
                 "application/json")
    assert [(f["index"], f["identical"]) for f in resp.json["failed"]] == [(1, False), (2, True)]
    assert client.simulate_get("/tests", params={"clinic_id": "C001"}).json[0]["result"] == 1


def test_items_of_a_json_array_that_are_not_objects_fail_alone(client, record):
    resp = batch(client, json.dumps([record, None, "x", 3]), "application/json")
    assert resp.json["created"] == 1
    assert [(f["index"], f["test_id"], f["status"]) for f in resp.json["failed"]] == [
        (1, None, 400), (2, None, 400), (3, None, 400)]


@pytest.mark.parametrize("body", ['{"test_id": "a"}', '"records"', "null", "[{", "", "[1,]"])
def test_a_json_body_that_is_not_an_array_of_items_is_400_whole(client, body):
    assert_problem(batch(client, body, "application/json"), 400)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/ndjson-ish", "application/jsonl"])
def test_other_content_types_are_415(client, record, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    assert_problem(client.simulate_post("/tests/_batch", body=ndjson([record]), headers=headers), 415)


@pytest.mark.both_engines
def test_an_atomic_batch_stores_all_with_201(client, record):
    resp = batch(client, ndjson([{**record, "test_id": "a1"}, {**record, "test_id": "a2"}]), query="atomic=true")
    assert resp.status_code == 201
    assert resp.json == {"received": 2, "created": 2, "failed": []}
    assert listed(client) == ["a1", "a2"]


def test_atomic_false_is_the_default_behaviour(client, record):
    resp = batch(client, ndjson([record, "{"]), query="atomic=false")
    assert resp.status_code == 200 and resp.json["created"] == 1


@pytest.mark.both_engines
def test_an_atomic_batch_with_any_failure_stores_nothing_and_lists_every_failure(client, record):
    assert post(client, {**record, "test_id": "taken"}).status_code == 201
    body = ndjson([{**record, "test_id": "n1"}, {**record, "test_id": "taken"}, {**record, "result": None}])
    resp = batch(client, body, query="atomic=true")
    problem = assert_problem(resp, 400)
    assert resp.headers["content-type"] == "application/problem+json"
    assert [(f["index"], f["status"]) for f in problem["failed"]] == [(1, 409), (2, 400)]
    assert (problem["received"], problem["created"]) == (3, 0)
    assert listed(client) == ["taken"]


def test_an_atomic_batch_failing_only_on_duplicates_is_409(client, record):
    assert post(client, {**record, "test_id": "taken"}).status_code == 201
    body = ndjson([{**record, "test_id": "n1"}, {**record, "test_id": "taken"}, {**record, "test_id": "n1"}])
    problem = assert_problem(batch(client, body, query="atomic=true"), 409)
    assert [(f["index"], f["identical"]) for f in problem["failed"]] == [(1, True), (2, True)]
    assert listed(client) == ["taken"]


@pytest.mark.parametrize("query", ["atomic=yes", "atomic=True", "atomic=", "atomic=true&atomic=true", "dry_run=1"])
def test_bad_batch_parameters_are_400_naming_them(client, record, query):
    body = assert_problem(batch(client, ndjson([record]), query=query), 400)
    assert body["errors"][0]["field"] == query.split("=")[0]
    assert listed(client) == []


@pytest.mark.parametrize("content_type, encode", [("application/x-ndjson", ndjson), ("application/json", json.dumps)])
def test_more_than_10000_records_is_413_and_nothing_is_stored(client, content_type, encode):
    records = [make(f"r{i}") for i in range(MAX_BATCH_RECORDS + 1)]
    assert_problem(batch(client, encode(records), content_type), 413)
    assert listed(client, "C1") == []


@pytest.mark.both_engines
def test_10000_records_is_one_batch(client):
    resp = batch(client, ndjson([make(f"r{i:05d}") for i in range(MAX_BATCH_RECORDS)]))
    assert resp.json == {"received": MAX_BATCH_RECORDS, "created": MAX_BATCH_RECORDS, "failed": []}


def test_the_batch_byte_limit_is_its_own_and_413_beyond_it(tmp_path, clock, record):
    body = ndjson([{**record, "test_id": f"t{i}"} for i in range(20)]).encode()
    settings = Settings(db_path=str(tmp_path / "r.db"), max_body_bytes=100, max_batch_bytes=len(body), auth="disabled")
    client = falcon.testing.TestClient(create_app(settings, clock=clock))
    assert batch(client, body).json["created"] == 20  # far over RECORDS_MAX_BODY_BYTES, at the batch limit
    assert_problem(batch(client, body.replace(b'"t', b'"u') + b"\n"), 413)
    assert len(listed(client)) == 20


@pytest.fixture
def transactions(monkeypatch, engine) -> list:
    """The write transactions the store runs from now on (each a BEGIN and its COMMIT or ROLLBACK)."""
    if engine == "postgresql":
        from records_service.store.postgres import PostgresStore as Store
    else:
        from records_service.store.sqlite import SQLiteStore as Store
    run: list = []
    write = Store._write

    def counted(store, work, **options):
        run.append(work)
        return write(store, work, **options)

    monkeypatch.setattr(Store, "_write", counted)
    return run


@pytest.mark.both_engines
def test_a_whole_batch_is_one_transaction_whatever_fails_in_it(client, transactions):
    assert post(client, make("taken")).status_code == 201
    del transactions[:]
    records = [make(f"r{i:05d}") for i in range(MAX_BATCH_RECORDS - 3)]
    resp = batch(client, ndjson([*records, "{oops", make("taken"), records[0]]))
    assert (resp.json["created"], len(resp.json["failed"])) == (MAX_BATCH_RECORDS - 3, 3)
    assert len(transactions) == 1


@pytest.mark.both_engines
def test_an_atomic_batch_that_fails_validation_writes_nothing_and_one_that_meets_a_duplicate_rolls_back_one(
        client, transactions):
    assert post(client, make("taken")).status_code == 201
    del transactions[:]
    assert_problem(batch(client, ndjson([make("n1"), "{oops"]), query="atomic=true"), 400)
    assert transactions == []
    assert_problem(batch(client, ndjson([make("n1"), make("taken")]), query="atomic=true"), 409)
    assert len(transactions) == 1
    assert listed(client, "C1") == ["taken"]


@pytest.mark.both_engines
def test_a_clinics_records_follow_its_last_seq_when_the_clock_is_behind_it(client, raw_db):
    """A record stored with a seq ahead of this host's clock (written straight into the table, as
    by a host whose clock ran fast): the clinic's next records follow it, one apart, in order."""
    assert post(client, make("first")).status_code == 201
    ahead = 9_000_000_000_000_000
    raw_db.execute("INSERT INTO records (clinic_id, seq, test_id, patient_id, test_type, status, collected_at,"
                   " version, request_id, doc) SELECT clinic_id, ?, 'ahead', patient_id, test_type, status,"
                   " collected_at, 1, request_id, replace(doc, '\"first\"', '\"ahead\"') FROM records"
                   " WHERE test_id = 'first'", (ahead,))
    resp = batch(client, ndjson([make("b1"), make("elsewhere", clinic_id="C2"), make("b2")]))
    assert resp.status_code == 200 and resp.json["created"] == 3, resp.text
    seqs = dict(raw_db.execute("SELECT test_id, seq FROM records WHERE clinic_id = 'C1'"))
    assert (seqs["b1"], seqs["b2"]) == (ahead + 1, ahead + 2)
    assert raw_db.execute("SELECT seq FROM records WHERE test_id = 'elsewhere'")[0][0] < ahead
    assert listed(client, "C1") == ["first", "ahead", "b1", "b2"]


def test_a_batch_logs_counts_never_clinical_data(client, record, caplog):
    caplog.set_level("INFO")
    secret = {**record, "result": "SECRET-RESULT", "notes": "SECRET-NOTES"}
    batch(client, ndjson([secret, secret, "{oops"]), query="")
    done = [r for r in caplog.records if r.getMessage() == "request completed"][-1]
    assert (done.received, done.stored, done.failed) == (3, 1, 2)
    committed = [r for r in caplog.records if r.getMessage() == "committed"][-1]
    assert committed.stored == 1
    assert "SECRET" not in caplog.text


NOW = datetime(2025, 6, 1, tzinfo=timezone.utc)


def test_a_record_for_a_clinic_the_key_may_not_see_fails_with_403():
    principal = Principal(key_id="k1", roles=frozenset({"ingest"}), clinics=frozenset({"C1"}))
    items = [make("mine", clinic_id="C1"), make("theirs", clinic_id="C2"), make("mine2", clinic_id="C1")]
    accepted, failed = _triage(items, NOW, principal)
    assert [record["test_id"] for _, record in accepted] == ["mine", "mine2"]
    assert list(failed) == [1]
    assert (failed[1]["test_id"], failed[1]["status"], failed[1]["type"]) == (
        "theirs", 403, "urn:records-service:problem:forbidden-clinic")
