"""GET /tests at scale: filters, keyset paging with RFC 8288 links, tamper-proof cursors, index use."""

from __future__ import annotations

import base64
import itertools
import json
import re
import sqlite3
from datetime import datetime, timezone
from urllib.parse import parse_qsl, urlsplit

import falcon.testing
import pytest

from records_service.store.sqlite import counters, migrations, records
from records_service.app import create_app
from records_service.seed import seed_rows
from tests.test_api import assert_problem

NDJSON = {"Content-Type": "application/x-ndjson"}


def make(test_id, clinic_id="C1", patient_id="P1", test_type="CBC", status="final",
         collected_at="2025-05-01T10:00:00Z", **extra) -> dict:
    return {"test_id": test_id, "clinic_id": clinic_id, "patient_id": patient_id, "test_type": test_type,
            "result": 1.5, "status": status, "collected_at": collected_at, **extra}


def ingest(client, records) -> None:
    body = "\n".join(json.dumps(r) for r in records)
    resp = client.simulate_post("/tests/_batch", body=body, headers=NDJSON)
    assert resp.status_code == 200 and resp.json["failed"] == [], resp.text


def ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [r["test_id"] for r in resp.json]


def next_url(resp) -> str | None:
    link = resp.headers.get("link")
    if link is None:
        return None
    match = re.fullmatch(r'<([^>]*)>; rel="next"', link)
    assert match, link
    return match.group(1)


def follow(client, url: str):
    parts = urlsplit(url)
    return client.simulate_get(parts.path, query_string=parts.query)


def walk(client, query: str) -> tuple[list[str], list[int]]:
    """Every test_id over all pages, and each page's size."""
    resp = client.simulate_get("/tests", query_string=query)
    seen, sizes = ids(resp), [len(resp.json)]
    while (url := next_url(resp)) is not None:
        resp = follow(client, url)
        seen += ids(resp)
        sizes.append(len(resp.json))
    return seen, sizes


@pytest.fixture
def varied(client):
    """Eight records of one clinic that differ in every filtered field, and one of another clinic."""
    records = [
        make("a", patient_id="P1", test_type="CBC", status="final", collected_at="2025-01-01T00:00:00Z"),
        make("b", patient_id="P2", test_type="CBC", status="preliminary", collected_at="2025-01-15T12:00:00Z"),
        make("c", patient_id="P1", test_type="HbA1c", status="final", collected_at="2025-02-01T00:00:00Z"),
        make("d", patient_id="P2", test_type="HbA1c", status="corrected", collected_at="2025-02-01T00:00:00.5Z"),
        make("e", patient_id="P1", test_type="LDL", status="cancelled", collected_at="2025-03-01T05:30:00+05:30"),
        make("f", patient_id="P3", test_type="CBC", status="final", collected_at="2025-03-10T00:00:00Z"),
        make("g", patient_id="P1", test_type="CBC", status="final", collected_at="2025-04-01T00:00:00Z"),
        make("h", patient_id="P3", test_type=" LDL ", status="preliminary", collected_at="2025-04-02T00:00:00Z"),
        make("other", clinic_id="C2", patient_id="P1", test_type="CBC", collected_at="2025-01-01T00:00:00Z"),
    ]
    ingest(client, records)
    return client


@pytest.mark.both_engines
@pytest.mark.parametrize("query, expected", [
    ("clinic_id=C1", list("abcdefgh")),
    ("clinic_id=C1&patient_id=P1", list("aceg")),
    ("clinic_id=C1&test_type=CBC", list("abfg")),
    ("clinic_id=C1&test_type=%20LDL%20", list("eh")),  # trimmed, as the record's test_type is
    ("clinic_id=C1&status=final", list("acfg")),
    ("clinic_id=C1&status=cancelled", ["e"]),
    ("clinic_id=C1&collected_from=2025-02-01T00:00:00Z", list("cdefgh")),  # inclusive
    ("clinic_id=C1&collected_to=2025-02-01T00:00:00Z", list("ab")),  # exclusive
    ("clinic_id=C1&collected_to=2025-02-01T00:00:00.5Z", list("abc")),
    ("clinic_id=C1&collected_from=2025-03-01T00:00:00Z&collected_to=2025-03-01T00:00:00.000001Z", ["e"]),
    ("clinic_id=C1&collected_from=2025-03-01T05:30:00%2B05:30&collected_to=2025-03-01T00:00:01Z", ["e"]),
    ("clinic_id=C1&patient_id=P1&test_type=CBC", list("ag")),
    ("clinic_id=C1&patient_id=P1&test_type=CBC&status=final&collected_from=2025-03-01T00:00:00Z", ["g"]),
    ("clinic_id=C1&test_type=CBC&status=preliminary", ["b"]),
    ("clinic_id=C1&patient_id=P9", []),
    ("clinic_id=C1&collected_from=2030-01-01T00:00:00Z", []),  # a range in the future is a fair question
    ("clinic_id=C1&collected_from=0999-06-01T00:00:00Z", list("abcdefgh")),  # year 999 stays 4 digits wide
    ("clinic_id=C1&collected_to=0999-06-01T00:00:00Z", []),
])
def test_filters_combine_and_keep_ingest_order(varied, query, expected):
    assert ids(varied.simulate_get("/tests", query_string=query)) == expected


@pytest.mark.both_engines
def test_a_voided_record_stays_listed_and_entered_in_error_is_a_filter_value(varied, settings):
    assert varied.simulate_delete("/tests/c", headers={"If-Match": '"1"'}).status_code == 200
    assert ids(varied.simulate_get("/tests", query_string="clinic_id=C1&status=entered-in-error")) == ["c"]
    assert ids(varied.simulate_get("/tests", query_string="clinic_id=C1")) == list("abcdefgh")


@pytest.mark.parametrize("query, names", [
    ("clinic_id=C1&limit=0", ["limit"]),
    ("clinic_id=C1&limit=1001", ["limit"]),
    ("clinic_id=C1&limit=ten", ["limit"]),
    ("clinic_id=C1&limit=-5", ["limit"]),
    ("clinic_id=C1&limit=%205", ["limit"]),
    ("clinic_id=C1&limit=", ["limit"]),
    ("clinic_id=C1&limit=1&limit=2", ["limit"]),
    ("clinic_id=C1&status=FINAL", ["status"]),
    ("clinic_id=C1&status=", ["status"]),
    ("clinic_id=C1&test_type=%20%20%20", ["test_type"]),
    ("clinic_id=C1&test_type=" + "x" * 65, ["test_type"]),
    ("clinic_id=C1&test_type=a%07b", ["test_type"]),
    ("clinic_id=C1&patient_id=P%201", ["patient_id"]),
    ("clinic_id=C1&patient_id=", ["patient_id"]),
    ("clinic_id=C1&collected_from=2025-01-01", ["collected_from"]),
    ("clinic_id=C1&collected_from=2025-01-01T00:00:00", ["collected_from"]),  # no offset
    ("clinic_id=C1&collected_to=2025-02-30T00:00:00Z", ["collected_to"]),
    ("clinic_id=C1&collected_to=2025-01-01T00:00:00+05:30", ["collected_to"]),  # '+' unencoded is a space
    ("clinic_id=C1&cursor=", ["cursor"]),
    ("clinic_id=C1&cursor=not-a-cursor", ["cursor"]),
    ("clinic_id=C1&sort=seq", ["sort"]),
    ("clinic_id=C1&status=final&status=final", ["status"]),
    ("patient_id=P1", ["clinic_id"]),
    ("clinic_id=C1&status=done&limit=0&patient_id=a%20b", ["patient_id", "status", "limit"]),  # every one at once
])
def test_bad_parameters_are_400_naming_them(client, query, names):
    body = assert_problem(client.simulate_get("/tests", query_string=query), 400)
    assert [e["field"] for e in body["errors"]] == names
    assert names[0] in body["detail"]


@pytest.mark.parametrize("query, got", [
    ("collected_to=2025-01-01T00:00:00+05:30", "'2025-01-01T00:00:00 05:30'"),
    ("collected_from=2025-01-01T00:00:00.5+0530", "'2025-01-01T00:00:00.5 0530'"),
    ("collected_from=2025-01-01T00:00:00%2005", "'2025-01-01T00:00:00 05'"),
])
def test_a_plus_left_unencoded_is_shown_as_it_arrived_with_a_hint_at_2b(client, query, got):
    body = assert_problem(client.simulate_get("/tests", query_string="clinic_id=C1&" + query), 400)
    message = body["errors"][0]["message"]
    assert f"(got {got})" in message and "%2B" in message and message in body["detail"]


def test_a_bad_time_filter_shows_what_arrived_without_a_plus_hint(client):
    body = assert_problem(client.simulate_get("/tests", query_string="clinic_id=C1&collected_to=yesterday"), 400)
    assert "(got 'yesterday')" in body["errors"][0]["message"] and "%2B" not in body["detail"]


@pytest.mark.both_engines
def test_pages_follow_next_links_to_the_end_and_the_last_has_none(client):
    ingest(client, [make(f"t{i:02d}") for i in range(7)])
    seen, sizes = walk(client, "clinic_id=C1&limit=3")
    assert seen == [f"t{i:02d}" for i in range(7)]
    assert sizes == [3, 3, 1]


@pytest.mark.both_engines
def test_pages_spanning_many_database_pages_keep_ingest_order(client):
    """A page's documents come from dozens of B-tree leaves here (notes of 1,500 characters,
    two records to a 4 KiB page), ingested interleaved with another clinic's, and stay in
    ingest order, through the clinic's range and through the patient index."""
    records = []
    for i in range(300):
        records.append(make(f"a{i:03d}", patient_id=f"P{i % 3}", notes="n" * 1500))
        records.append(make(f"b{i:03d}", clinic_id="C2", notes="n" * 1500))
    for chunk in range(0, len(records), 200):
        ingest(client, records[chunk:chunk + 200])
    seen, sizes = walk(client, "clinic_id=C1&limit=250")
    assert seen == [f"a{i:03d}" for i in range(300)] and sizes == [250, 50]
    seen, _ = walk(client, "clinic_id=C1&patient_id=P1&limit=60")
    assert seen == [f"a{i:03d}" for i in range(1, 300, 3)]


def test_an_exactly_full_last_page_has_no_next_link(client):
    ingest(client, [make(f"t{i}") for i in range(6)])
    seen, sizes = walk(client, "clinic_id=C1&limit=3")
    assert sizes == [3, 3] and len(seen) == 6


def test_the_default_page_is_100_records(client):
    ingest(client, [make(f"t{i:03d}") for i in range(101)])
    resp = client.simulate_get("/tests", params={"clinic_id": "C1"})
    assert len(resp.json) == 100 and next_url(resp)
    assert ids(follow(client, next_url(resp))) == ["t100"]


def test_limit_1000_is_allowed(client):
    ingest(client, [make(f"t{i:04d}") for i in range(1001)])
    resp = client.simulate_get("/tests", params={"clinic_id": "C1", "limit": "1000"})
    assert len(resp.json) == 1000 and next_url(resp)


def test_the_next_link_carries_the_same_filters_in_clean_form(varied):
    resp = varied.simulate_get("/tests", query_string="clinic_id=C1&test_type=%20CBC&status=final"
                                                       "&collected_from=2024-12-31T20:00:00-04:00&limit=1")
    assert ids(resp) == ["a"]
    url = next_url(resp)
    parts = urlsplit(url)
    assert parts.path == "/tests"
    params = dict(parse_qsl(parts.query))
    assert params.pop("cursor")
    assert params == {"clinic_id": "C1", "test_type": "CBC", "status": "final",
                      "collected_from": "2025-01-01T00:00:00Z", "limit": "1"}
    assert ids(follow(varied, url)) == ["f"]


def test_a_cursor_may_be_used_with_another_limit(varied):
    first = varied.simulate_get("/tests", query_string="clinic_id=C1&limit=2")
    query = dict(parse_qsl(urlsplit(next_url(first)).query), limit="10")
    assert ids(varied.simulate_get("/tests", params=query)) == list("cdefgh")


@pytest.mark.both_engines
def test_a_cursor_serves_any_app_on_the_same_database(varied, settings, clock):
    url = next_url(varied.simulate_get("/tests", query_string="clinic_id=C1&limit=4"))
    other = falcon.testing.TestClient(create_app(settings, clock=clock))
    assert ids(follow(other, url)) == list("efgh")


def _cursor_of(resp) -> tuple[dict, str]:
    params = dict(parse_qsl(urlsplit(next_url(resp)).query))
    return params, params["cursor"]


def test_an_edited_cursor_is_as_forged_as_garbage(varied):
    params, token = _cursor_of(varied.simulate_get("/tests", query_string="clinic_id=C1&limit=2"))
    raw = bytearray(base64.urlsafe_b64decode(token))
    for position in (7, 8, len(raw) - 1):  # the seq it carries, and its signature
        edited = bytearray(raw)
        edited[position] ^= 1
        forged = base64.urlsafe_b64encode(bytes(edited)).decode()
        body = assert_problem(varied.simulate_get("/tests", params={**params, "cursor": forged}), 400)
        assert [e["field"] for e in body["errors"]] == ["cursor"]


@pytest.mark.both_engines
def test_a_cursor_for_other_filters_is_400(varied):
    params, token = _cursor_of(varied.simulate_get("/tests", query_string="clinic_id=C1&status=final&limit=1"))
    for other in ({"clinic_id": "C2"}, {"clinic_id": "C1"}, {"clinic_id": "C1", "status": "cancelled"},
                  {"clinic_id": "C1", "status": "final", "patient_id": "P1"}):
        body = assert_problem(varied.simulate_get("/tests", params={**other, "cursor": token}), 400)
        assert [e["field"] for e in body["errors"]] == ["cursor"]


@pytest.mark.both_engines
def test_records_ingested_while_paging_are_not_repeated_and_come_after(client):
    ingest(client, [make(f"old{i}") for i in range(4)])
    first = client.simulate_get("/tests", query_string="clinic_id=C1&limit=2")
    ingest(client, [make("new0")])
    rest, _ = walk(client, urlsplit(next_url(first)).query)
    assert ids(first) + rest == ["old0", "old1", "old2", "old3", "new0"]


def test_the_list_logs_the_count_it_returned(varied, caplog):
    caplog.set_level("INFO", logger="records_service.http")
    varied.simulate_get("/tests", query_string="clinic_id=C1&patient_id=P1&limit=3")
    done = [r for r in caplog.records if r.getMessage() == "request completed"]
    assert done[-1].count == 3


# -- every filter combination is served by an index -----------------------------------------

OPTIONAL = {"patient_id": "P1", "test_type": "CBC", "status": "final",
            "collected_from": "2025-01-01T00:00:00Z", "collected_to": "2025-02-01T00:00:00Z"}
COMBINATIONS = [combo for n in range(len(OPTIONAL) + 1) for combo in itertools.combinations(OPTIONAL, n)]


def _plans(conn, combo) -> list[tuple[str, list[str]]]:
    filters = {"clinic_id": "C0001", **{name: OPTIONAL[name] for name in combo}}
    plans = []
    for after_seq, limit in ((0, 101), (123, 1001), (0, None)):  # first page, later page, export
        sql, params = records.select_records(filters, after_seq, limit)
        plans.append((sql, [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]))
    return plans


def _assert_indexed(conn, combo) -> None:
    # One search that yields rows in seq order: no table scan, no sort of what matched. A clinic's
    # pages come from its range of the table (clustered by clinic and seq); a patient's through
    # its own index.
    if "patient_id" in combo:
        expected = "SEARCH records USING INDEX records_by_patient (clinic_id=? AND patient_id=? AND seq>?)"
    else:
        expected = "SEARCH records USING PRIMARY KEY (clinic_id=? AND seq>?)"
    for sql, plan in _plans(conn, combo):
        assert plan == [expected], (sql, plan)


@pytest.mark.sqlite_only(reason="the query plans of SQLite's schema")
@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: "+".join(c) or "clinic only")
def test_every_filter_combination_is_an_index_search_in_seq_order(tmp_path, combo):
    conn = sqlite3.connect(tmp_path / "plan.db", isolation_level=None)
    migrations.migrate(conn)
    _assert_indexed(conn, combo)


@pytest.mark.sqlite_only(reason="the query plans of SQLite's schema")
def test_plans_hold_once_the_planner_has_statistics_of_a_skewed_database(tmp_path):
    conn = sqlite3.connect(tmp_path / "plan.db", isolation_level=None)
    migrations.migrate(conn)
    rows = seed_rows(20_000, 20, datetime(2025, 6, 1, tzinfo=timezone.utc), rng_seed=1)
    conn.execute("BEGIN")
    records.insert_rows(conn, list(rows), None)
    counters.fold(conn)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    for combo in COMBINATIONS:
        _assert_indexed(conn, combo)


@pytest.mark.sqlite_only(reason="the query plans of SQLite's schema")
def test_stats_read_a_clinics_counts_and_tail_by_primary_key(tmp_path):
    conn = sqlite3.connect(tmp_path / "plan.db", isolation_level=None)
    migrations.migrate(conn)
    plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + counters._STATS_SQL, ("C1",))]
    assert [step for step in plan if step.startswith(("SEARCH", "SCAN"))] == [
        "SEARCH clinic_counts USING PRIMARY KEY (clinic_id=?)",
        "SEARCH records USING PRIMARY KEY (clinic_id=? AND seq>?)",
        "SEARCH clinic_marks USING PRIMARY KEY (clinic_id=?)"], plan
    plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + counters._TIMES_SQL, ("C1",))]
    assert [step for step in plan if step.startswith(("SEARCH", "SCAN")) and step != "SCAN CONSTANT ROW"] == [
        "SEARCH clinic_times USING PRIMARY KEY (clinic_id=?)"] * 2, plan
