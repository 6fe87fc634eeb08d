"""A process's write slots (store/base.py WriterSlots): writes past the slots wait while writes flow
and are refused once the slots are stuck, so waiting writes never take every thread."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from records_service.store import StoreBusy
from records_service.store.base import WriterSlots


def test_a_burst_after_a_quiet_spell_waits_for_slots_instead_of_being_refused():
    slots = WriterSlots(2, wait_s=1.0, stuck_s=0.1)
    time.sleep(0.15)  # quiet for longer than stuck_s: nothing was held, so nothing is stuck
    both_in = threading.Barrier(3)

    def holding_write() -> str:
        both_in.wait(5)
        time.sleep(0.05)
        return "held"

    with ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(slots.run, holding_write) for _ in range(2)]
        both_in.wait(5)  # both slots are taken now
        assert slots.run(lambda: "third") == "third"
        assert [holder.result(5) for holder in holders] == ["held", "held"]


def test_a_write_past_slots_held_unmoved_for_the_stuck_time_is_refused_at_once():
    slots = WriterSlots(2, wait_s=5.0, stuck_s=0.1)
    release, both_in = threading.Event(), threading.Barrier(3)

    def stuck_write() -> None:
        both_in.wait(5)
        release.wait(10)

    with ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(slots.run, stuck_write) for _ in range(2)]
        both_in.wait(5)
        time.sleep(0.15)
        started = time.monotonic()
        with pytest.raises(StoreBusy):
            slots.run(lambda: None)
        refused_after = time.monotonic() - started
        release.set()
        for holder in holders:
            holder.result(5)
    assert refused_after < 1.0, f"refused after {refused_after:.2f} s, not at once (wait_s is 5 s)"
