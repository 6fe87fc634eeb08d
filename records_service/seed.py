"""Synthetic records for demos and benchmarks, made fast enough to fill a million-record database in seconds.

The records look like a clinic network's: clinic sizes follow Zipf's law (weight 1/k^0.9, so
with 500 clinics the largest holds about 11% of the records and the smallest about 0.04%),
each clinic has its own patients (about eight tests each), plausible test types with their
units and value ranges (a few with text results), mostly `final` statuses, occasional notes,
and collection times spread over the year before the seed. Every record is what POST /tests
would have stored for it; the rows are assembled from pre-encoded JSON pieces instead of
`json.dumps` per record (a test checks they equal what `store.prepare` makes).
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import queue
import random
import secrets
import sys
import threading
import time
from array import array
from collections import deque
from datetime import datetime, timedelta
from itertools import accumulate, count, islice, repeat
from operator import add, mul
from typing import Callable, Iterator, NamedTuple, TextIO

from .validate import utc_millis

ZIPF_EXPONENT = 0.9
TESTS_PER_PATIENT = 8
CHUNK_ROWS = 10_000
CHUNKS_AHEAD = 16  # about 70 MB of pickled rows waiting for the reader
_END = b""  # no pickled chunk is empty
SPAN_S = 365 * 86_400  # collected_at falls in the year before the seed

# (test_type, unit, low, high, decimals, weight): numeric results, uniform in [low, high].
NUMERIC_TESTS = (
    ("HbA1c", "%", 4.0, 12.0, 1, 8),
    ("Glucose", "mmol/L", 3.5, 15.0, 1, 10),
    ("LDL", "mmol/L", 1.0, 6.0, 2, 7),
    ("HDL", "mmol/L", 0.6, 2.5, 2, 6),
    ("TSH", "mIU/L", 0.1, 8.0, 2, 6),
    ("Creatinine", "umol/L", 40, 160, 0, 8),
    ("CRP", "mg/L", 0.1, 80.0, 1, 6),
    ("Hemoglobin", "g/dL", 9.0, 18.0, 1, 10),
    ("WBC", "10^9/L", 3.0, 15.0, 1, 8),
    ("Potassium", "mmol/L", 3.0, 6.0, 1, 6),
    ("Sodium", "mmol/L", 128, 150, 0, 6),
    ("ALT", "U/L", 5, 120, 0, 5),
    ("Vitamin D", "nmol/L", 20, 150, 0, 4),
    ("Ferritin", "ug/L", 10, 400, 0, 3),
)
# (test_type, results, weight): text results, no unit.
TEXT_TESTS = (
    ("SARS-CoV-2 PCR", ("not detected", "not detected", "not detected", "detected"), 3),
    ("Urine culture", ("no growth", "mixed growth", "E. coli > 10^5 CFU/mL"), 2),
    ("Blood group", ("O+", "A+", "B+", "AB+", "O-", "A-"), 1),
)
STATUSES = (("final", 90), ("preliminary", 5), ("corrected", 3), ("cancelled", 2))
NOTES = ((None, 85), ("fasting sample", 6), ("repeat requested by GP", 4), ("haemolysed, redrawn", 3),
         ("patient on anticoagulants", 2))


def clinic_ids(clinics: int) -> list[str]:
    width = max(4, len(str(clinics)))
    return [f"C{n:0{width}d}" for n in range(1, clinics + 1)]


def clinic_weights(clinics: int) -> list[float]:
    return [k ** -ZIPF_EXPONENT for k in range(1, clinics + 1)]


def _weighted(pairs, rng: random.Random, k: int) -> list:
    values, weights = zip(*pairs)
    return rng.choices(values, weights, k=k)


def _middles(rng: random.Random, size: int = 4096) -> list[tuple[str, str, str]]:
    """(test_type, status, the record's JSON from "test_type" to "status") for a pool of results."""
    kinds = [(t, w) for *t, w in NUMERIC_TESTS] + [(t, w) for *t, w in TEXT_TESTS]
    pool = []
    for kind, status in zip(_weighted(kinds, rng, size), _weighted(STATUSES, rng, size)):
        if len(kind) == 5:
            test_type, unit, low, high, decimals = kind
            result = round(rng.uniform(low, high), decimals) if decimals else rng.randint(low, high)
        else:
            (test_type, results), unit = kind, None
            result = rng.choice(results)
        text = (f'"test_type": {json.dumps(test_type)}, "result": {json.dumps(result)}, '
                f'"unit": {json.dumps(unit)}, "status": {json.dumps(status)}')
        pool.append((test_type, status, text))
    return pool


class _Pieces(NamedTuple):
    """What every row of one seed run is made from, drawn once (in the order the rows draw after)."""

    run: str
    stamp: str
    request_id: str
    tail: str                      # the JSON after "notes": created_at, updated_at, version, request_id
    ids: list[str]
    patient_prefixes: list[str]
    patients: list[int]            # each clinic's number of patients
    cumulative: list[float]        # clinic weights, cumulated for rng.choices
    middles: list[tuple[str, str, str]]
    notes: list[str]
    days: list[str]
    times: list[str]
    first_second: int


def _pieces(records: int, clinics: int, now: datetime, rng: random.Random, run: str | None) -> _Pieces:
    run = run or secrets.token_hex(3)
    request_id = f"seed-{run}"
    stamp = utc_millis(now)
    weights = clinic_weights(clinics)
    total_weight = sum(weights)
    ids = clinic_ids(clinics)
    # A year before `now`, to the second: a day part and a time-of-day part, pre-formatted.
    start = (now - timedelta(days=365)).replace(microsecond=0)
    return _Pieces(
        run=run, stamp=stamp, request_id=request_id,
        tail=f', "created_at": "{stamp}", "updated_at": "{stamp}", "version": 1, "request_id": "{request_id}"}}',
        ids=ids, patient_prefixes=[f"P{clinic_id[1:]}-" for clinic_id in ids],
        patients=[max(1, round(records * w / total_weight / TESTS_PER_PATIENT)) for w in weights],
        cumulative=list(accumulate(weights)),
        middles=_middles(rng),
        notes=[f", \"notes\": {json.dumps(note)}" for note in _weighted(NOTES, rng, 1000)],
        days=[(start + timedelta(days=d)).strftime("%Y-%m-%d") for d in range(366)],
        times=[f"T{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(86_400)],
        first_second=start.hour * 3600 + start.minute * 60 + start.second)


def seed_rows(records: int, clinics: int, now: datetime, *, rng_seed: int | None = None,
              run: str | None = None) -> Iterator[tuple]:
    """Yield `records` rows in the shape of `store.NewRow` (plain tuples, faster): test_id, clinic_id,
    patient_id, test_type, status, collected_at sort key, created_at, request_id, doc.

    test_ids are `seed-<run>-<n>` with a fresh `run` each time, so seeding twice adds records.
    """
    rng = random.Random(rng_seed)
    p = _pieces(records, clinics, now, rng, run)
    run, stamp, request_id, tail, ids, patients, days, times = (p.run, p.stamp, p.request_id, p.tail, p.ids,
                                                               p.patients, p.days, p.times)
    patient_prefixes, first_second = p.patient_prefixes, p.first_second
    clinic_numbers = range(clinics)
    uniform = rng.random

    n = 0
    while n < records:
        k = min(CHUNK_ROWS, records - n)
        # Every row draws in this order; seed_rows_in_key_order draws the same, so it makes the same rows.
        for clinic, (test_type, status, middle), note in zip(
                rng.choices(clinic_numbers, cum_weights=p.cumulative, k=k),
                rng.choices(p.middles, k=k), rng.choices(p.notes, k=k)):
            n += 1
            test_id = f"seed-{run}-{n:08d}"
            clinic_id = ids[clinic]
            patient_id = f"{patient_prefixes[clinic]}{int(uniform() * patients[clinic]):06d}"
            second = first_second + int(uniform() * SPAN_S)
            collected = days[second // 86_400] + times[second % 86_400]
            yield (test_id, clinic_id, patient_id, test_type, status, collected + ".000000000Z", stamp, request_id,
                   f'{{"test_id": "{test_id}", "clinic_id": "{clinic_id}", "patient_id": "{patient_id}", {middle}, '
                   f'"collected_at": "{collected}Z"{note}{tail}')


def seed_rows_in_key_order(records: int, clinics: int, now: datetime, *, rng_seed: int | None = None,
                           run: str | None = None) -> Iterator[tuple]:
    """`seed_rows`' rows (the very same, for the same `rng_seed` and `run`) grouped by clinic in
    clinic_id order, each clinic's in seed_rows' order: the order of the records table (clinic_id,
    seq), so a store appends them without staging or sorting (`SQLiteStore.bulk_insert`). A
    seed's records are then written one clinic after another (so /audit lists them).

    It draws every row's random numbers first, as seed_rows would (28 bytes a row, kept in arrays),
    then formats one clinic's rows after another: its first row comes after all the draws.
    """
    rng = random.Random(rng_seed)
    p = _pieces(records, clinics, now, rng, run)
    run, stamp, request_id, tail, patients = p.run, p.stamp, p.request_id, p.tail, p.patients
    clinic_numbers, middle_numbers, note_numbers = range(clinics), range(len(p.middles)), range(len(p.notes))
    uniform = rng.random
    first_second = p.first_second
    places_of = [array("q") for _ in range(clinics)]  # each clinic's rows, by their place in seed_rows
    middle_of, note_of, patient_of, second_of = array("H"), array("H"), array("q"), array("q")

    for start in range(0, records, CHUNK_ROWS):
        k = min(CHUNK_ROWS, records - start)
        chosen = rng.choices(clinic_numbers, cum_weights=p.cumulative, k=k)
        middle_of.extend(rng.choices(middle_numbers, k=k))  # the same draws as choosing from the pieces
        note_of.extend(rng.choices(note_numbers, k=k))
        draws = [uniform() for _ in range(2 * k)]  # each row's patient, then its second, as seed_rows draws them
        patient_of.extend(map(int, map(mul, draws[0::2], map(patients.__getitem__, chosen))))
        second_of.extend(map(add, repeat(first_second), map(int, map(mul, draws[1::2], repeat(SPAN_S)))))
        deque(map(array.append, map(places_of.__getitem__, chosen), count(start)), maxlen=0)

    middles, notes, days, times = p.middles, p.notes, p.days, p.times
    for clinic_id, prefix, places in zip(p.ids, p.patient_prefixes, places_of):
        clinic_part = f'", "clinic_id": "{clinic_id}", "patient_id": "{prefix}'
        for place in places:
            test_id = f"seed-{run}-{place + 1:08d}"
            patient_number = f"{patient_of[place]:06d}"
            second = second_of[place]
            collected = days[second // 86_400] + times[second % 86_400]
            test_type, status, middle = middles[middle_of[place]]
            yield (test_id, clinic_id, prefix + patient_number, test_type, status, collected + ".000000000Z", stamp,
                   request_id, f'{{"test_id": "{test_id}{clinic_part}{patient_number}", {middle}, '
                   f'"collected_at": "{collected}Z"{notes[note_of[place]]}{tail}')


def rows_made_in_another_process(make: Callable[..., Iterator[tuple]], *args, **kwargs) -> Iterator[tuple]:
    """The rows of `make(*args, **kwargs)`, made in a child process (started now) while this one
    stores them: making a row costs about as much as storing it, and the machine has two cores.

    Rows come through a pipe in pickled chunks of CHUNK_ROWS (unpickling a row costs this process
    about a fifth of making it), the child up to CHUNKS_AHEAD chunks ahead. Closing the iterator
    (the store failed) ends the child.
    """
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold threads
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_send_rows, args=(sender, make, args, kwargs), daemon=True,
                            name="records_service seed rows")
    child.start()
    sender.close()

    def rows() -> Iterator[tuple]:
        try:
            while (data := receiver.recv_bytes()) != _END:
                yield from pickle.loads(data)
            child.join()
        except EOFError:
            child.join(5)
            raise RuntimeError(f"the process making rows stopped (exit code {child.exitcode})") from None
        finally:
            receiver.close()
            if child.is_alive():
                child.terminate()
                child.join()

    return rows()


def _send_rows(sender, make: Callable[..., Iterator[tuple]], args: tuple, kwargs: dict) -> None:
    """Make and pickle chunks in this (the child's) main thread; a thread writes them to the pipe.

    The pipe holds 64 KiB, a chunk 4 MB: written from this thread, making rows would stop while
    the reader is busy storing (inside an executemany of 50,000 rows), and the two processes
    would take turns instead of running side by side. The queue lets the maker run CHUNKS_AHEAD
    chunks ahead; the writing thread waits in write(), which holds no GIL.
    """
    pickled: queue.Queue = queue.Queue(maxsize=CHUNKS_AHEAD)
    stopped = threading.Event()

    def write() -> None:
        try:
            while (data := pickled.get()) is not None:
                sender.send_bytes(data)
            sender.send_bytes(_END)
        except BrokenPipeError:  # the reader stopped early (the store failed, or the iterator was closed)
            stopped.set()
            while pickled.get() is not None:  # so the maker never waits on a full queue
                pass
        finally:
            sender.close()

    writer = threading.Thread(target=write, name="send rows", daemon=True)
    writer.start()
    made = make(*args, **kwargs)
    while not stopped.is_set() and (chunk := list(islice(made, CHUNK_ROWS))):
        pickled.put(pickle.dumps(chunk, pickle.HIGHEST_PROTOCOL))
    pickled.put(None)
    writer.join()


class ProgressBar:
    """A one-line progress bar redrawn in place on a terminal; silent anywhere else. With no
    `total` (an import does not know how many items will come) it shows the count and the rate."""

    def __init__(self, total: int | None, stream: TextIO = sys.stderr, clock: Callable[[], float] = time.perf_counter,
                 unit: str = "records") -> None:
        self._total = total
        self._stream = stream
        self._clock = clock
        self._unit = unit
        self._started = clock()
        self._shown = stream.isatty()

    def update(self, done: int, note: str = "") -> None:
        if not self._shown:
            return
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = done / elapsed
        if self._total is None:
            self._stream.write(f"\r{note}  {done:,} {self._unit}  {rate:,.0f} {self._unit}/s ")
            self._stream.flush()
            return
        filled = int(30 * done / self._total)
        eta = (self._total - done) / rate if rate else 0
        self._stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {100 * done / self._total:5.1f}% "
                           f"{done:,}/{self._total:,}  {rate:,.0f} {self._unit}/s  eta {eta:4.0f}s ")
        self._stream.flush()

    def close(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()
