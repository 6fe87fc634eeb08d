"""GET /tests/_export (NDJSON, every matching record) and GET /tests/_stats (a clinic at a glance)."""

from __future__ import annotations

import json
import random
import sqlite3
from datetime import datetime, timezone

import falcon.testing
import pytest

from records_service.app import create_app
from records_service.store.sqlite import SQLiteStore as Store
from records_service.store import open_store
from records_service.validate import client_fields, timestamp_from_sort_key
from records_service.seed import seed_rows
from tests.live import damage_pages_holding
from tests.test_api import assert_problem
from tests.test_listing import ingest, make, varied  # noqa: F401  (fixture)


def export(client, query):
    return client.simulate_get("/tests/_export", query_string=query)


def lines(resp) -> list[dict]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/x-ndjson"
    assert resp.text == "" or resp.text.endswith("\n")
    return [json.loads(line) for line in resp.text.split("\n")[:-1]]


@pytest.mark.both_engines
def test_export_streams_every_record_in_ingest_order_one_per_line(varied):
    listed = varied.simulate_get("/tests", params={"clinic_id": "C1"}).json
    assert lines(export(varied, "clinic_id=C1")) == listed


@pytest.mark.parametrize("query, expected", [
    ("clinic_id=C1&patient_id=P1", list("aceg")),
    ("clinic_id=C1&test_type=CBC&status=final", list("afg")),
    ("clinic_id=C1&collected_from=2025-02-01T00:00:00Z&collected_to=2025-03-10T00:00:00Z", list("cde")),
    ("clinic_id=C2", ["other"]),
])
def test_export_takes_the_same_filters(varied, query, expected):
    assert [r["test_id"] for r in lines(export(varied, query))] == expected


def test_an_export_with_no_match_is_an_empty_body(client):
    resp = export(client, "clinic_id=C9")
    assert lines(resp) == [] and resp.text == ""


@pytest.mark.both_engines
def test_export_is_not_paged_and_goes_past_any_page_size(client):
    ingest(client, [make(f"t{i:04d}") for i in range(2500)])  # more than one fetch chunk, more than a page
    exported = lines(export(client, "clinic_id=C1"))
    assert [r["test_id"] for r in exported] == [f"t{i:04d}" for i in range(2500)]


@pytest.mark.parametrize("query, name", [
    ("", "clinic_id"), ("clinic_id=C%201", "clinic_id"), ("clinic_id=C1&limit=10", "limit"),
    ("clinic_id=C1&cursor=x", "cursor"), ("clinic_id=C1&status=FINAL", "status"),
    ("clinic_id=C1&collected_to=yesterday", "collected_to"),
])
def test_export_rejects_what_it_does_not_take(client, query, name):
    body = assert_problem(export(client, query), 400)
    assert [e["field"] for e in body["errors"]] == [name]


@pytest.mark.both_engines
def test_export_logs_its_own_completion_under_the_request_id(varied, log_lines):
    resp = varied.simulate_get("/tests/_export", params={"clinic_id": "C1"}, headers={"X-Request-ID": "exp-1"})
    assert resp.status_code == 200
    done = [line for line in log_lines if line["message"] == "export completed"]
    assert len(done) == 1
    assert done[0]["request_id"] == "exp-1" and done[0]["count"] == 8 and done[0]["duration_ms"] >= 0


def seeded_then_damaged(db_path, records: int, damaged_at: int) -> None:
    """A database of `records` seed records of clinic C0001, closed, then the pages holding the
    record at position `damaged_at` of its export overwritten (tests.live.damage_pages_holding)."""
    store = Store(str(db_path))
    for _ in store.bulk_insert(seed_rows(records, 1, datetime.now(timezone.utc), rng_seed=7)):
        pass
    store.close()
    with sqlite3.connect(db_path) as conn:
        doc = conn.execute("SELECT doc FROM records ORDER BY seq LIMIT 1 OFFSET ?", (damaged_at,)).fetchone()[0]
    conn.close()
    assert damage_pages_holding(db_path, doc.encode()) >= 1


def test_a_database_error_before_the_first_byte_of_an_export_is_a_problem_not_a_broken_stream(
        settings, clock, caplog):
    caplog.set_level("INFO")
    seeded_then_damaged(settings.db_path, 3000, damaged_at=500)  # inside the first chunk, past its first row
    client = falcon.testing.TestClient(create_app(settings, clock=clock))
    resp = client.simulate_get("/tests/_export", params={"clinic_id": "C0001"}, headers={"X-Request-ID": "exp-broken"})
    body = assert_problem(resp, 503)  # the store's StoreCorrupt, as for any other read
    assert body["request_id"] == "exp-broken" and "malformed" not in resp.text
    done = [r for r in caplog.records if r.getMessage() == "request completed"]
    assert [r.status for r in done] == [503]


@pytest.mark.both_engines
def test_stats_count_by_type_and_status_with_the_first_and_last_collection(varied):
    resp = varied.simulate_get("/tests/_stats", params={"clinic_id": "C1"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert resp.json == {
        "clinic_id": "C1", "total": 8,
        "by_test_type": {"CBC": 4, "HbA1c": 2, "LDL": 2},
        "by_status": {"cancelled": 1, "corrected": 1, "final": 4, "preliminary": 2},
        "first_collected_at": "2025-01-01T00:00:00Z",
        "last_collected_at": "2025-04-02T00:00:00Z",
    }


@pytest.mark.both_engines
def test_stats_keep_fractional_seconds_of_the_extremes(client):
    ingest(client, [make("x", collected_at="2025-01-01T00:00:00.250Z"), make("y", collected_at="2025-01-02T00:00:00.5Z")])
    body = client.simulate_get("/tests/_stats", params={"clinic_id": "C1"}).json
    assert (body["first_collected_at"], body["last_collected_at"]) == ("2025-01-01T00:00:00.25Z", "2025-01-02T00:00:00.5Z")


@pytest.mark.both_engines
def test_stats_of_a_clinic_without_records(client):
    resp = client.simulate_get("/tests/_stats", params={"clinic_id": "C9"})
    assert resp.json == {"clinic_id": "C9", "total": 0, "by_test_type": {}, "by_status": {},
                         "first_collected_at": None, "last_collected_at": None}


@pytest.mark.parametrize("query, name", [
    ("", "clinic_id"), ("clinic_id=_x", "clinic_id"), ("clinic_id=C1&clinic_id=C2", "clinic_id"),
    ("clinic_id=C1&status=final", "status"), ("clinic_id=C1&limit=5", "limit"),
])
def test_stats_take_a_valid_clinic_id_and_nothing_else(client, query, name):
    body = assert_problem(client.simulate_get("/tests/_stats", query_string=query), 400)
    assert [e["field"] for e in body["errors"]] == [name]


@pytest.mark.parametrize("path", ["/tests/_export", "/tests/_stats", "/tests/_batch"])
def test_the_collection_paths_answer_405_to_other_methods(client, path):
    resp = client.simulate_request("DELETE", path)
    assert_problem(resp, 405)
    assert resp.headers["allow"]


def _recounted(raw_db, clinic_id: str) -> dict:
    """/tests/_stats of a clinic recounted from its records, the truth the counters must equal."""
    groups = raw_db.execute("SELECT test_type, status, count(*), min(collected_at), max(collected_at) FROM records"
                            " WHERE clinic_id = ? GROUP BY 1, 2", (clinic_id,))
    by_type, by_status = {}, {}
    for test_type, status, n, _, _ in groups:
        by_type[test_type] = by_type.get(test_type, 0) + n
        by_status[status] = by_status.get(status, 0) + n
    return {"clinic_id": clinic_id, "total": sum(by_type.values()), "by_test_type": dict(sorted(by_type.items())),
            "by_status": dict(sorted(by_status.items())),
            "first_collected_at": timestamp_from_sort_key(min(g[3] for g in groups)) if groups else None,
            "last_collected_at": timestamp_from_sort_key(max(g[4] for g in groups)) if groups else None}


@pytest.mark.both_engines
def test_the_counts_behind_stats_follow_every_insert_and_change(client, settings, record, raw_db):
    ingest(client, [make(f"b{i}", clinic_id=f"C{i % 3}", test_type=("CBC", "LDL")[i % 2],
                         collected_at=f"2025-01-{i % 28 + 1:02d}T00:00:00Z") for i in range(60)])
    assert client.simulate_post("/tests", json=record).status_code == 201
    store = open_store(settings)
    for _ in store.bulk_insert(seed_rows(500, 4, datetime(2025, 6, 1, tzinfo=timezone.utc), rng_seed=9)):
        pass
    conn = raw_db
    clinics = [row[0] for row in conn.execute("SELECT DISTINCT clinic_id FROM records")]
    for clinic_id in clinics:
        assert client.simulate_get("/tests/_stats", params={"clinic_id": clinic_id}).json == _recounted(conn, clinic_id)

    # Corrections and voids at random, some of counted records, some of records still in their
    # clinic's tail: the stats, first and last times included, always equal a recount.
    rng = random.Random(7)
    test_ids = [row[0] for row in conn.execute("SELECT test_id FROM records")]
    for step in range(300):
        if step % 50 == 0:
            store.migrate()  # SQLite folds every tail: later changes hit counted records
        current = json.loads(conn.execute("SELECT doc FROM records WHERE test_id = ?", (rng.choice(test_ids),))[0][0])
        if current["status"] == "entered-in-error":
            continue
        if rng.random() < 0.2:
            store.void(current["test_id"], expected=frozenset({current["version"]}), request_id=f"s{step}",
                       now="2025-06-02T00:00:00.000Z")
        else:
            fields = {**client_fields(current), "status": rng.choice(["final", "corrected"]),
                      "test_type": rng.choice(["CBC", "LDL", "HbA1c"]),
                      "collected_at": f"20{rng.randint(10, 24)}-01-01T00:00:00Z"}
            store.correct(fields, expected=frozenset({current["version"]}), request_id=f"s{step}",
                          now="2025-06-02T00:00:00.000Z")
        assert store.clinic_stats(current["clinic_id"]) == _recounted(conn, current["clinic_id"]), f"after step {step}"
    mismatches = store.check()["counter_mismatches"]
    assert mismatches and set(mismatches.values()) == {0}, mismatches
    store.close()
