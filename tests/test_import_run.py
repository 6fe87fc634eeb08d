"""Import runs end to end: real upstreams on loopback, the real command, a real database.

Nothing twice, nothing lost: each page's records and the source's progress commit together, so
a run stopped by an upstream down past its retries or by `kill -9` resumes at the first page not
committed (the upstream's request log shows no committed page asked for again) and stores every
item once.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from records_service.__main__ import main
from records_service.config import Settings
from records_service.store import open_store
from tests.live import REPO, on_a_terminal
from tests.upstream import Reply, Upstream, fhir_pages, graphql_pages, rest_body_pages, rest_link_pages

TOKEN = "s3cr3t-token-77a1"


def items(n: int, start: int = 0, **changes) -> list[dict]:
    """Upstream items in lab A's shape; `updated` grows with the item number (the watermark)."""
    return [{"id": f"LAB-{i:05d}", "patient": {"mrn": f"P-{i % 7}"}, "code": "HbA1c", "value": 5 + i / 100,
             "unit": "%", "state": "F", "collected": "2025-05-01T10:00:00+02:00", "comment": None,
             "updated": f"2025-05-20T00:00:{i:05d}Z", **changes} for i in range(start, start + n)]


LAB_A_FIELDS = """
[fields]
test_id = "id"
clinic_id = { value = "C001" }
patient_id = "patient.mrn"
test_type = "code"
result = "value"
unit = "unit"
status = "state"
collected_at = "collected"
notes = "comment"

[values.status]
F = "final"
P = "preliminary"
C = "corrected"
"""


def source_toml(url: str, *, name: str = "lab-a", retries: int = 3, extra: str = "") -> str:
    return f"""
name = "{name}"
kind = "rest"
url = "{url}"
headers = {{ Authorization = "Bearer ${{LAB_TOKEN}}" }}
watermark = "updated"
since = "2000"
timeout = 2
retries = {retries}
rate = 1000
{extra}
{LAB_A_FIELDS}"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    """The command's environment: a database in tmp_path, the token the source file names."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("RECORDS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RECORDS_DB_PATH", str(tmp_path / "records.db"))
    monkeypatch.setenv("LAB_TOKEN", TOKEN)
    return tmp_path


@pytest.fixture
def store(env):
    store = open_store(Settings(db_path=str(env / "records.db")))
    yield store
    store.close()


def write_source(env: Path, text: str, name: str = "source.toml") -> str:
    path = env / name
    path.write_text(text)
    return str(path)


def run_import(capsys, *args: str) -> tuple[int, dict, list[dict]]:
    """`python -m records_service import ARGS` in this process: exit status, the summary (the last
    line of standard output), the log lines (standard error, every one JSON)."""
    status = main(["import", *args])
    out, err = capsys.readouterr()
    assert TOKEN not in out and TOKEN not in err
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return status, json.loads(out.splitlines()[-1]), logs


def pages_asked(upstream: Upstream, since: int = 0) -> list[int]:
    return [int(seen.query.get("page", "1")) for seen in upstream.requests[since:]]


def test_a_rest_list_with_link_paging_is_imported_whole(env, store, capsys):
    with Upstream(rest_link_pages(items(25), 10, watermark_key="updated")) as upstream:
        status, summary, logs = run_import(capsys, write_source(env, source_toml(upstream.url("/results?since={since}"))))
    assert status == 0
    assert {k: summary[k] for k in ("source", "pages", "fetched", "created", "updated", "unchanged", "failed",
                                    "complete", "failures")} == {
        "source": "lab-a", "pages": 3, "fetched": 25, "created": 25, "updated": 0, "unchanged": 0, "failed": 0,
        "complete": True, "failures": []}
    assert [seen.query["since"] for seen in upstream.requests[:1]] == ["2000"]
    assert all(seen.headers["authorization"] == f"Bearer {TOKEN}" for seen in upstream.requests)
    record = json.loads(store.current("LAB-00007").doc)
    assert record == {**record, "clinic_id": "C001", "patient_id": "P-0", "test_type": "HbA1c", "result": 5.07,
                      "unit": "%", "status": "final", "collected_at": "2025-05-01T08:00:00Z", "notes": None,
                      "version": 1, "request_id": summary["request_id"]}
    audit = store.audit(summary["request_id"])
    assert len(audit) == 25 and {a["key_id"] for a in audit} == {"import:lab-a"}
    messages = [line["message"] for line in logs]
    run_lines = logs[messages.index("import started"):]
    assert {line.get("request_id") for line in run_lines} == {summary["request_id"]}
    assert {line.get("key_id") for line in run_lines} == {"import:lab-a"}
    assert messages.count("page fetched") == 3 and "import finished" in messages


def test_trace_tells_the_story_of_a_run(env, capsys):
    with Upstream(rest_link_pages(items(12), 5)) as upstream:
        upstream.faults = [Reply(503, headers={"Retry-After": "0"})]
        assert main(["import", write_source(env, source_toml(upstream.url("/results")))]) == 0
    out, err = capsys.readouterr()
    request_id = json.loads(out.splitlines()[-1])["request_id"]
    (env / "import.log").write_text(err)
    assert main(["trace", request_id, str(env / "import.log")]) == 0
    story = capsys.readouterr().out
    assert story.count("page fetched") == 3 and story.count("committed") == 3
    assert "upstream retry" in story and "wait_s=0" in story and "import finished" in story


def test_the_next_run_starts_from_the_saved_watermark_and_versions_what_changed(env, store, capsys):
    upstream_items = items(12)
    with Upstream(rest_link_pages(upstream_items, 5, watermark_key="updated")) as upstream:
        source = write_source(env, source_toml(upstream.url("/results?since={since}")))
        first = run_import(capsys, source)[1]
        asked = len(upstream.requests)
        upstream_items[3] = {**upstream_items[3], "value": 9.9, "state": "C", "updated": "2025-05-21T00:00:00Z"}
        upstream_items += items(2, start=100, updated="2025-05-21T00:00:01Z")
        status, second, _ = run_import(capsys, source)
        assert upstream.requests[asked].query["since"] == "2025-05-20T00:00:00011Z"  # the largest seen by the first
        status_third, third, _ = run_import(capsys, source)
        assert upstream.requests[-1].query["since"] == "2025-05-21T00:00:01Z"
    assert status == 0 and (second["created"], second["updated"], second["unchanged"]) == (2, 1, 0)
    assert second["request_id"] != first["request_id"]
    history = json.loads(store.history_json("LAB-00003")[0])
    assert [(v["version"], v["status"], v["result"], v["request_id"]) for v in history] == [
        (1, "final", 5.03, first["request_id"]), (2, "corrected", 9.9, second["request_id"])]
    assert status_third == 0 and (third["pages"], third["fetched"]) == (1, 0)  # nothing newer: one empty page
    assert store.count() == 14


def test_items_seen_again_are_unchanged(env, store, capsys):
    with Upstream(rest_link_pages(items(8), 5)) as upstream:  # an upstream that ignores ?since
        source = write_source(env, source_toml(upstream.url("/results?since={since}")))
        run_import(capsys, source)
        status, summary, _ = run_import(capsys, source)
    assert status == 0 and (summary["created"], summary["updated"], summary["unchanged"]) == (0, 0, 8)
    assert json.loads(store.current("LAB-00001").doc)["version"] == 1


def test_a_test_id_twice_in_one_page_is_created_then_versioned(env, store, capsys):
    upstream_items = items(3) + [{**items(1, start=1)[0], "value": 7.7, "state": "C"}] + items(1, start=1)
    with Upstream(rest_link_pages(upstream_items, 10)) as upstream:
        status, summary, _ = run_import(capsys, write_source(env, source_toml(upstream.url("/results"))))
    assert status == 0 and (summary["created"], summary["updated"], summary["unchanged"]) == (3, 2, 0)
    history = json.loads(store.history_json("LAB-00001")[0])
    assert [(v["version"], v["result"], v["status"]) for v in history] == [
        (1, 5.01, "final"), (2, 7.7, "corrected"), (3, 5.01, "final")]


def test_invalid_voided_and_other_clinics_items_are_reported_and_left_alone(env, store, capsys, record):
    now = "2025-05-01T00:00:00.000Z"
    for test_id, clinic in (("LAB-00002", "C001"), ("LAB-00004", "C999")):
        store.insert({**record, "test_id": test_id, "clinic_id": clinic, "patient_id": "P-2"}, request_id="r",
                     now=now)
    store.void("LAB-00002", expected=frozenset({1}), request_id="void", now=now)
    upstream_items = items(6)
    upstream_items[1]["collected"] = "yesterday"
    upstream_items[5]["code"] = None
    with Upstream(rest_link_pages(upstream_items, 4)) as upstream:
        status, summary, _ = run_import(capsys, write_source(env, source_toml(upstream.url("/results"))))
    assert status == 1
    assert (summary["created"], summary["failed"], summary["complete"]) == (2, 4, True)
    failures = {(f["page"], f["index"], f["test_id"]): f["detail"] for f in summary["failures"]}
    assert list(failures) == [(1, 1, "LAB-00001"), (1, 2, "LAB-00002"), (2, 0, "LAB-00004"), (2, 1, "LAB-00005")]
    assert failures[(1, 1, "LAB-00001")].startswith("collected_at must be an RFC 3339 date-time")
    assert "voided" in failures[(1, 2, "LAB-00002")]
    assert "another clinic" in failures[(2, 0, "LAB-00004")]
    assert failures[(2, 1, "LAB-00005")] == "test_type is required"
    assert json.loads(store.current("LAB-00002").doc)["version"] == 2  # still the void
    assert json.loads(store.current("LAB-00004").doc)["clinic_id"] == "C999"
    assert store.current("LAB-00001") is None


def test_an_upstream_answering_500_twice_is_retried_and_the_run_completes(env, store, capsys):
    with Upstream(rest_link_pages(items(12), 5)) as upstream:
        upstream.faults = [Reply(500), Reply(500)]
        status, summary, logs = run_import(capsys, write_source(env, source_toml(upstream.url("/results"))))
    assert status == 0 and summary["created"] == 12 and len(upstream.requests) == 5
    retries = [line for line in logs if line["message"] == "upstream retry"]
    assert [r["wait_s"] for r in retries] == [0.5, 1.0]
    assert all(r["request_id"] == summary["request_id"] for r in retries)


class Breakable:
    """A paged upstream whose pages from `from_page` on answer 503 while `broken`."""

    def __init__(self, handler, from_page: int) -> None:
        self.handler, self.from_page, self.broken = handler, from_page, True

    def __call__(self, seen):
        if self.broken and int(seen.query.get("page", "1")) >= self.from_page:
            return Reply(503, {"error": "maintenance"})
        return self.handler(seen)


def test_an_upstream_down_past_its_retries_exits_3_and_the_next_run_resumes_where_it_stopped(env, store, capsys):
    upstream_handler = Breakable(rest_link_pages(items(50), 10, watermark_key="updated"), from_page=3)
    with Upstream(upstream_handler) as upstream:
        source = write_source(env, source_toml(upstream.url("/results?since={since}"), retries=2))
        status, stopped, _ = run_import(capsys, source)
        assert status == 3 and stopped["complete"] is False
        assert (stopped["pages"], stopped["created"]) == (2, 20) and store.count() == 20
        asked = len(upstream.requests)
        assert pages_asked(upstream) == [1, 2, 3, 3]

        upstream_handler.broken = False
        status, resumed, _ = run_import(capsys, source)
    assert pages_asked(upstream, asked) == [3, 4, 5]  # no committed page asked for again
    assert status == 0 and resumed["request_id"] == stopped["request_id"]
    assert (resumed["pages"], resumed["fetched"], resumed["created"], resumed["complete"]) == (5, 50, 50, True)
    assert store.count() == 50
    assert len(store.audit(resumed["request_id"])) == 50


def test_a_page_the_database_refuses_stops_the_run_with_exit_3_and_the_next_run_resumes(env, store, capsys,
                                                                                       monkeypatch):
    monkeypatch.setenv("RECORDS_BUSY_TIMEOUT_MS", "200")
    store.open()
    other_writer = os.open(f"{env / 'records.db'}-writer", os.O_RDWR)  # as a worker holding its turn
    pages, locked = rest_link_pages(items(15), 5), []

    def locking_at_page_2(seen):
        if seen.query.get("page") == "2" and not locked:
            fcntl.flock(other_writer, fcntl.LOCK_EX)
            locked.append(True)
        return pages(seen)

    try:
        with Upstream(locking_at_page_2) as upstream:
            source = write_source(env, source_toml(upstream.url("/results")))
            status, stopped, logs = run_import(capsys, source)
            assert status == 3 and (stopped["pages"], stopped["created"]) == (1, 5)
            assert any(line["message"] == "page not stored" for line in logs)
            fcntl.flock(other_writer, fcntl.LOCK_UN)
            asked = len(upstream.requests)
            status, resumed, _ = run_import(capsys, source)
    finally:
        os.close(other_writer)
    assert status == 0 and pages_asked(upstream, asked) == [2, 3] and store.count() == 15


def test_the_cli_says_why_it_stopped_with_exit_3(env, capsys):
    with Upstream(lambda seen: Reply(200, b"<html>upstream proxy error</html>")) as upstream:
        status = main(["import", write_source(env, source_toml(upstream.url("/results"), retries=1))])
    out, err = capsys.readouterr()
    assert status == 3
    assert "Traceback" not in err and "page 1:" in err and "not valid JSON" in err
    assert json.loads(out.splitlines()[-1])["complete"] is False


def test_a_run_killed_with_kill_9_resumes_at_the_first_page_not_committed(env, store):
    slow = rest_link_pages(items(60), 10)
    with Upstream(lambda seen: Reply(**{**vars(slow(seen)), "hang_s": 0.3})) as upstream:
        source = write_source(env, source_toml(upstream.url("/results")))
        cli_env = {**os.environ, "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "records_service", "import", source]
        proc = subprocess.Popen(command, cwd=env, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while len(upstream.requests) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.15)  # inside page 4's request
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        committed = store.import_progress("lab-a")["pages"]
        assert 2 <= committed <= 4 and store.count() == committed * 10
        asked = len(upstream.requests)
        done = subprocess.run(command, cwd=env, env=cli_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    assert pages_asked(upstream, asked) == list(range(committed + 1, 7))
    summary = json.loads(done.stdout.splitlines()[-1])
    assert (summary["pages"], summary["created"], summary["fetched"]) == (6, 60, 60)
    assert store.count() == 60


def test_runs_killed_at_random_moments_store_every_item_once_and_never_ask_for_a_committed_page_again(env, store):
    rng = random.Random(7)
    pages = rest_link_pages(items(4000), 100)
    # 40 pages, each answered after 30 ms: three runs of at most 0.4 s each cannot finish them.
    with Upstream(lambda seen: Reply(**{**vars(pages(seen)), "hang_s": 0.03})) as upstream:
        source = write_source(env, source_toml(upstream.url("/results")))
        command = [sys.executable, "-m", "records_service", "import", source]
        cli_env = {**os.environ, "PYTHONPATH": str(REPO)}
        for _ in range(3):
            progress = store.import_progress("lab-a")
            committed = progress["pages"] if progress else 0
            asked = len(upstream.requests)
            proc = subprocess.Popen(command, cwd=env, env=cli_env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            while len(upstream.requests) == asked and proc.poll() is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.05, 0.4))  # somewhere in a page's fetch, mapping or transaction
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            if len(upstream.requests) > asked:
                assert pages_asked(upstream, asked)[0] == committed + 1
        progress = store.import_progress("lab-a")
        asked = len(upstream.requests)
        done = subprocess.run(command, cwd=env, env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert pages_asked(upstream, asked)[0] == progress["pages"] + 1
    summary = json.loads(done.stdout.splitlines()[-1])
    assert (summary["pages"], summary["fetched"], summary["created"], summary["complete"]) == (40, 4000, 4000, True)
    assert store.count() == 4000 and len(store.audit(summary["request_id"])) == 4000


def test_a_graphql_connection_is_imported_and_errors_fail_the_page(env, store, capsys):
    graphql = """
name = "lab-g"
kind = "graphql"
url = "{url}"
query = "query($after: String, $since: String) {{ results(after: $after, since: $since) {{ nodes {{ id }} }} }}"
records = "data.results.nodes"
cursor = "data.results.pageInfo.endCursor"
has_next = "data.results.pageInfo.hasNextPage"
rate = 1000
retries = 1
""" + LAB_A_FIELDS.replace("{", "{{").replace("}", "}}")
    with Upstream(graphql_pages(items(7), 3)) as upstream:
        status, summary, _ = run_import(capsys, write_source(env, graphql.format(url=upstream.url("/graphql"))))
    assert status == 0 and (summary["pages"], summary["created"]) == (3, 7)
    assert [seen.json()["variables"]["after"] for seen in upstream.requests] == [None, "c3", "c6"]
    assert all(seen.method == "POST" for seen in upstream.requests)

    broken = {"errors": [{"message": "Cannot query field \"nodes\""}], "data": None}
    with Upstream(lambda seen: Reply(200, broken)) as upstream:
        status, summary, _ = run_import(capsys, write_source(
            env, graphql.format(url=upstream.url("/graphql")).replace("lab-g", "lab-h")))
    assert status == 3 and summary["pages"] == 0 and len(upstream.requests) == 1


def test_a_rest_api_with_the_next_url_in_the_body(env, store, capsys):
    with Upstream(lambda seen: handler(seen)) as upstream:
        handler = rest_body_pages(items(9), 4, upstream.url(""))
        source = source_toml(upstream.url("/v2/results"), extra='records = "data"\nnext = "meta.next"')
        status, summary, _ = run_import(capsys, write_source(env, source))
    assert status == 0 and (summary["pages"], summary["created"]) == (3, 9)
    assert upstream.paths() == ["/v2/results", "/v2/results?page=2", "/v2/results?page=3"]


def observation(n: int, status: str = "final") -> dict:
    return {"resourceType": "Observation", "id": f"obs-{n}", "meta": {"lastUpdated": f"2025-05-20T10:00:{n:02d}Z"},
            "identifier": [{"system": "urn:lab", "value": f"ACC-{n}"}], "status": status,
            "category": [{"coding": [{"code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "43396009"},
                                {"system": "http://loinc.org", "code": "4548-4", "display": "HbA1c"}]},
            "subject": {"identifier": {"value": f"MRN-{n % 3}"}}, "effectiveDateTime": "2025-05-01T08:30:00+01:00",
            "valueQuantity": {"value": 5 + n / 10, "unit": "%", "system": "http://unitsofmeasure.org"}}


def test_a_fhir_search_bundle_of_observations_with_the_shipped_example(env, store, capsys, monkeypatch):
    observations = [observation(n) for n in range(7)]
    observations[2]["status"] = "amended"
    observations[5]["status"] = "entered-in-error"
    example = (REPO / "examples" / "fhir-observations.toml").read_text()
    with Upstream(lambda seen: handler(seen)) as upstream:
        handler = fhir_pages(observations, 3, upstream.url(""))
        text = example.replace(example.split('url = "', 1)[1].split('"', 1)[0], upstream.url("/fhir/Observation"))
        monkeypatch.setenv("FHIR_TOKEN", TOKEN)
        status, summary, _ = run_import(capsys, write_source(env, text))
    assert status == 1 and (summary["pages"], summary["created"], summary["failed"]) == (3, 6, 1)
    assert summary["failures"][0]["test_id"] == "ACC-5" and "status must be one of" in summary["failures"][0]["detail"]
    amended = json.loads(store.current("ACC-2").doc)
    assert {k: amended[k] for k in ("clinic_id", "patient_id", "test_type", "result", "unit", "status",
                                    "collected_at")} == {
        "clinic_id": "C001", "patient_id": "MRN-2", "test_type": "4548-4", "result": 5.2, "unit": "%",
        "status": "corrected", "collected_at": "2025-05-01T07:30:00Z"}
    assert store.import_progress("fhir-observations")["watermark"] == "2025-05-20T10:00:06Z"


def test_dry_run_fetches_and_validates_but_stores_nothing(env, store, capsys):
    upstream_items = items(6)
    upstream_items[4]["value"] = True
    with Upstream(rest_link_pages(upstream_items, 4)) as upstream:
        status, summary, _ = run_import(capsys, write_source(env, source_toml(upstream.url("/results"))), "--dry-run")
    assert status == 1 and (summary["fetched"], summary["failed"], summary["created"]) == (6, 1, 0)
    assert summary["failures"][0]["index"] == 0 and summary["failures"][0]["page"] == 2
    assert store.count() == 0 and store.import_progress("lab-a") is None


@pytest.mark.parametrize("change, named", [
    (lambda text: text.replace('kind = "rest"', 'kind = "rest"\ncolour = "red"'), "colour: is not a key"),
    (lambda text: text.replace('kind = "rest"', 'kind = "soap"'), "kind: must be one of rest, graphql"),
    (lambda text: text.replace("timeout = 2", 'timeout = "2"'), "timeout: must be a number"),
    (lambda text: text.replace("LAB_TOKEN", "UNSET_TOKEN"), "headers.Authorization: the environment variable "
                                                             "UNSET_TOKEN is not set"),
])
def test_an_invalid_source_file_exits_2_naming_the_key_and_fetches_nothing(env, capsys, change, named):
    with Upstream(rest_link_pages(items(3), 5)) as upstream:
        status = main(["import", write_source(env, change(source_toml(upstream.url("/results"))))])
    out, err = capsys.readouterr()
    assert status == 2 and upstream.requests == [] and out == ""
    assert len(err.strip().splitlines()) == 1 and named in err


def test_no_progress_bar_when_standard_error_is_not_a_terminal_and_one_on_a_terminal(env):
    with Upstream(rest_link_pages(items(30), 10)) as upstream:
        source = write_source(env, source_toml(upstream.url("/results")))
        cli_env = {**os.environ, "PYTHONPATH": str(REPO)}
        piped = subprocess.run([sys.executable, "-m", "records_service", "import", source], cwd=env, env=cli_env,
                               capture_output=True, timeout=60)
        assert piped.returncode == 0
        assert all(line.startswith(b"{") for line in piped.stderr.splitlines())
        done, shown = on_a_terminal(lambda terminal: subprocess.run(
            [sys.executable, "-m", "records_service", "import", source], cwd=env,
            env={**cli_env, "RECORDS_LOG_LEVEL": "WARNING"}, stdout=subprocess.PIPE, stderr=terminal, timeout=60))
    assert done.returncode == 0
    assert b"\rpage 3  30 items" in shown and b"items/s" in shown


def test_the_dashboard_lists_each_source_with_its_last_run(env, store, capsys, client):
    with Upstream(Breakable(rest_link_pages(items(12), 5), from_page=2)) as upstream:
        run_import(capsys, write_source(env, source_toml(upstream.url("/results"), name="lab-b", retries=1)))
    with Upstream(rest_link_pages(items(3), 5)) as upstream:
        run_import(capsys, write_source(env, source_toml(upstream.url("/results"), name="lab-c")))
    page = client.simulate_get("/").text
    assert '<tr data-source="lab-b" data-complete="false">' in page and "resumes at page 2" in page
    assert '<tr data-source="lab-c" data-complete="true">' in page
