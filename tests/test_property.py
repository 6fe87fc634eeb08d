"""Property-based checks: random JSON never yields a 500; valid records always round-trip."""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta, timezone

import falcon.testing
import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from records_service.app import create_app
from records_service.config import Settings
from tests.conftest import Clock

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
FIELDS = ["test_id", "clinic_id", "patient_id", "test_type", "result", "unit", "status", "collected_at", "notes"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
# Objects shaped like records, so the interesting paths (validation, storage, conflicts) are reached.
record_like = st.fixed_dictionaries({}, optional={name: json_values for name in FIELDS})

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", fullmatch=True)
no_control = st.characters(blacklist_categories=("Cc", "Cs"))
offsets = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59)


@st.composite
def timestamps(draw):
    moment = draw(st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2025, 5, 31)))
    offset = draw(offsets)
    sign = "+" if offset >= 0 else "-"
    digits = draw(st.text("0123456789", min_size=0, max_size=9))
    fraction = f".{digits}" if digits else ""
    local = moment.replace(tzinfo=timezone.utc) + timedelta(minutes=offset)
    return local.strftime("%Y-%m-%dT%H:%M:%S") + fraction + f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"


valid_records = st.fixed_dictionaries(
    {
        "test_id": ids, "clinic_id": ids, "patient_id": ids,
        "test_type": st.text(no_control, min_size=1, max_size=64).filter(lambda s: s.strip()),
        "result": st.integers() | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=[chr(c) for c in range(32) if c not in (9, 10)] + [chr(c) for c in range(127, 160)]), min_size=1, max_size=50),
        "collected_at": timestamps(),
    },
    optional={
        "unit": st.none() | st.text(no_control, max_size=32),
        "status": st.sampled_from(["preliminary", "final", "corrected", "cancelled"]),
        "notes": st.none() | st.text(st.characters(blacklist_categories=("Cs",)), max_size=200),
    },
)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    db = tmp_path_factory.mktemp("prop") / "records.db"
    return falcon.testing.TestClient(create_app(Settings(db_path=str(db), auth="disabled"), clock=Clock(NOW)))


EXAMPLE_NUMBERS = itertools.count()
PROPERTY_SETTINGS = hyp_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY_SETTINGS
@given(doc=json_values | record_like)
def test_random_json_never_yields_a_server_error(client, doc):
    body = json.dumps(doc, allow_nan=True)  # NaN/Infinity on purpose: the service must refuse them cleanly.
    resp = client.simulate_post("/tests", body=body, headers={"Content-Type": "application/json"})
    assert resp.status_code in (201, 400, 409), resp.text
    if resp.status_code != 201:
        assert resp.headers["content-type"] == "application/problem+json"


@PROPERTY_SETTINGS
@given(raw=st.binary(max_size=300))
def test_random_bytes_never_yield_a_server_error(client, raw):
    resp = client.simulate_post("/tests", body=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code in (201, 400, 409), resp.text


@PROPERTY_SETTINGS
@given(doc=valid_records)
def test_valid_records_round_trip(client, doc):
    # Hypothesis draws the same ids again and again (shrinking favours "0"): make each one new.
    doc = {**doc, "test_id": f"{doc['test_id'][:54]}-{next(EXAMPLE_NUMBERS)}"}
    resp = client.simulate_post("/tests", body=json.dumps(doc), headers={"Content-Type": "application/json"})
    assert resp.status_code == 201, resp.text
    stored = resp.json
    expected = {**doc, "test_type": doc["test_type"].strip()}
    expected.setdefault("unit", None)
    expected.setdefault("status", "final")
    expected.setdefault("notes", None)
    sent = doc["collected_at"]  # always drawn as base + optional fraction + ±hh:mm
    back = stored["collected_at"]
    assert back.endswith("Z")
    assert datetime.fromisoformat(back[:19] + "+00:00") == datetime.fromisoformat(sent[:19] + sent[-6:])
    assert back[19:-1] == sent[19:-6], "fractional seconds are kept digit for digit"
    expected["collected_at"] = stored["collected_at"]
    assert {k: stored[k] for k in FIELDS} == expected
    assert client.simulate_get(f"/tests/{doc['test_id']}").json == stored
    exported = client.simulate_get("/tests/_export", params={"clinic_id": doc["clinic_id"]}).text
    # NDJSON lines end in "\n" alone: splitlines() would also cut at U+2028 and the like inside a string.
    assert stored in [json.loads(line) for line in exported.split("\n")[:-1]]
