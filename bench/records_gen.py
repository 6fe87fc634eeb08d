"""Synthetic medical test records for the benchmark: one generator, used for pre-filling the
database, for sizing the bare app's constant bodies, and mirrored field for field by
`record.lua` (keep the two in step: same test types, units, value ranges, notes).

Ids are fixed-width so every record of one kind serialises to (nearly) the same size:
clinics `C0001`..`C1000`, patients `P000001`.., pre-filled tests `seed-0000001`.., benchmark
tests `b<8 hex nonce>-<2-digit thread>-<7-digit counter>`.
"""

from __future__ import annotations

import json
import random
import uuid

CLINICS = 1000
RECORDS_PER_CLINIC = 100

# (test_type, unit, low, high, decimals): result is a number in [low, high].
TEST_TYPES = (
    ("HbA1c", "%", 4.0, 12.0, 1),
    ("LDL", "mmol/L", 1.0, 6.0, 2),
    ("Glucose", "mmol/L", 3.5, 15.0, 1),
    ("TSH", "mIU/L", 0.1, 8.0, 2),
    ("Creatinine", "umol/L", 40.0, 160.0, 0),
    ("CRP", "mg/L", 0.1, 80.0, 1),
)
NOTES = (None, "fasting sample", "repeat requested by GP", None, "haemolysed, redrawn", None)


def clinic_id(n: int) -> str:
    """The n-th clinic, 1-based: C0001 .. C1000."""
    return f"C{n:04d}"


def make_record(test_id: str, clinic: str, rng: random.Random) -> dict:
    """A realistic client record (what a lab system POSTs), collected in 2024 with an offset."""
    test_type, unit, low, high, decimals = rng.choice(TEST_TYPES)
    value = round(rng.uniform(low, high), decimals)
    if decimals == 0:
        value = int(value)
    return {
        "test_id": test_id,
        "clinic_id": clinic,
        "patient_id": f"P{rng.randrange(1, 1_000_000):06d}",
        "test_type": test_type,
        "result": value,
        "unit": unit,
        "status": "final",
        "collected_at": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
                        f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}+02:00",
        "notes": rng.choice(NOTES),
    }


def seed_test_id(n: int) -> str:
    return f"seed-{n:07d}"


def bench_test_id(nonce: str, thread: int, counter: int) -> str:
    """Same shape as post_tests.lua builds: b<nonce>-<thread>-<counter>."""
    return f"b{nonce}-{thread:02d}-{counter:07d}"


def prefill_records(clinics: int = CLINICS, per_clinic: int = RECORDS_PER_CLINIC, seed: int = 20240501):
    """Yield clinics*per_clinic records, clinics interleaved (record n goes to clinic n % clinics),
    so one clinic's rows are spread over the table as with real traffic."""
    rng = random.Random(seed)
    for n in range(clinics * per_clinic):
        yield make_record(seed_test_id(n + 1), clinic_id(n % clinics + 1), rng)


# -- what the service returns, for the bare app ----------------------------------------------

def stored_form(record: dict) -> dict:
    """A representative stored record: the client fields normalised as the service stores them
    (collected_at in UTC with Z), plus the four fields the service adds."""
    out = dict(record)
    out["collected_at"] = "2024-05-01T08:00:00Z"
    out.update({
        "created_at": "2025-01-01T00:00:00.000Z",
        "updated_at": "2025-01-01T00:00:00.000Z",
        "version": 1,
        "request_id": str(uuid.UUID(int=0)),
    })
    return out


def _encode(obj, compact: bool = False) -> bytes:
    # The service stores json.dumps(..., ensure_ascii=False) with default separators.
    separators = (",", ":") if compact else None
    return json.dumps(obj, ensure_ascii=False, separators=separators).encode("utf-8")


def fit(records: list[dict], target: int | None, as_array: bool) -> bytes:
    """Serialise `records` (one object, or a JSON array of them); when `target` is given, pad
    the last record's `notes` so the body is exactly `target` bytes. If the representative
    body is already longer than `target`, it is encoded without the spaces after `,` and `:`
    (25 bytes less per record) before padding."""
    records = [dict(r) for r in records]

    def encode(compact: bool) -> bytes:
        return _encode(records if as_array else records[0], compact)

    if target is None:
        return encode(False)
    for r in records:
        r["notes"] = ""  # padding then grows the body one byte per character
    for compact in (False, True):
        records[-1]["notes"] = ""
        short = target - len(encode(compact))
        if short >= 0:
            records[-1]["notes"] = "x" * short
            body = encode(compact)
            assert len(body) == target, (len(body), target)
            return body
    raise ValueError(f"target body size {target} is below the smallest representative body ({len(encode(True))})")


def representative_post_body(target: int | None = None) -> bytes:
    rng = random.Random(1)
    rec = make_record(bench_test_id("0" * 8, 0, 1), clinic_id(1), rng)
    return fit([stored_form(rec)], target, as_array=False)


def representative_get_body(target: int | None = None, records: int = RECORDS_PER_CLINIC) -> bytes:
    rng = random.Random(2)
    recs = [stored_form(make_record(seed_test_id(n * CLINICS + 1), clinic_id(1), rng))
            for n in range(records)]
    return fit(recs, target, as_array=True)
