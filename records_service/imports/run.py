"""One import run: fetch page after page, map and validate each item, store each page with the
source's progress in one transaction, and sum up.

A run is the walk from a first page (from `{since}`) to a last one. A run that stops (the
upstream down past its retries, the process killed) is resumed by the next invocation at the
first page not committed, under the same request ID: what a run changed is found under one ID
however many invocations it took. The store keeps the run's counts with its position, so the
summary is the whole run's. `--dry-run` walks a fresh run and stores nothing.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, TextIO

from ..logs import key_id_var, request_id_var
from ..seed import ProgressBar
from ..store import Store, StoreError
from ..store.imports import COUNTS, MAX_FAILURES, ImportConflict
from ..validate import utc_millis
from .fetch import Fetcher, UpstreamError
from .mapping import item_mapper, larger, record_of
from .paging import check_page, next_position, request_at
from .paths import resolve, resolve_all
from .source import Source

log = logging.getLogger("records_service.import")

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_UPSTREAM = 0, 1, 3


@dataclass
class Outcome:
    summary: dict        # the last line of standard output
    status: int          # the exit status
    problem: str | None  # why the run stopped before its last page (exit 3), for standard error


def since_text(value: Any) -> str:
    """A watermark as `{since}` carries it: a string as it is, a number as its JSON text."""
    return value if isinstance(value, str) else json.dumps(value)


def _watermark_value(item: Any, source: Source) -> Any:
    value = resolve(item, source.watermark) if source.watermark is not None else None
    ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
    return value if ok else None


def _empty_run(source: Source, request_id: str, since: str) -> dict:
    return {"source": source.name, "request_id": request_id, "since": since, "next": None, "complete": False,
            "run_watermark": None, "failures": [], **dict.fromkeys(COUNTS, 0)}


def summary_of(run: dict) -> dict:
    return {"source": run["source"], "request_id": run["request_id"],
            **{key: run[key] for key in COUNTS}, "complete": run["complete"],
            "failures": run["failures"][:MAX_FAILURES]}


def run_import(source: Source, store: Store, *, dry_run: bool = False, now: Callable[[], datetime],
               progress_stream: TextIO, sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Run (or resume) one import of `source` into `store`; see the module's docstring."""
    saved = store.import_progress(source.name)
    resuming = saved is not None and saved["next"] is not None and not dry_run
    if resuming:
        run = saved
    else:
        watermark = saved["watermark"] if saved is not None else None
        run = _empty_run(source, str(uuid.uuid4()), source.since if watermark is None else since_text(watermark))
    request_tokens = request_id_var.set(run["request_id"]), key_id_var.set(f"import:{source.name}")
    bar = ProgressBar(None, stream=progress_stream, unit="items")
    try:
        log.info("import resumed" if resuming else "import started",
                 extra={"source": source.name, "page": run["pages"] + 1, "dry_run": dry_run})
        problem = _walk(source, store, run, dry_run=dry_run, now=now, sleep=sleep, bar=bar)
        summary = summary_of(run)
        status = EXIT_UPSTREAM if problem else EXIT_ITEMS_FAILED if run["failed"] else EXIT_OK
        # `created` is a LogRecord attribute of its own: the count travels as records_created.
        counts = {("records_created" if k == "created" else k): v for k, v in summary.items() if k != "failures"}
        log.info("import stopped" if problem else "import finished", extra={**counts, "dry_run": dry_run})
        return Outcome(summary, status, problem)
    finally:
        bar.close()
        request_id_var.reset(request_tokens[0])
        key_id_var.reset(request_tokens[1])


def _walk(source: Source, store: Store, run: dict, *, dry_run: bool, now: Callable[[], datetime],
          sleep: Callable[[float], None], bar: ProgressBar) -> str | None:
    """Fetch and store pages from `run`'s position to the last page, updating `run` as the
    store saves it. Returns why the run stopped before its last page (the upstream could not be
    read, or the database refused the page: either way what was committed stays and the next
    run resumes), or None when the run completed."""
    fetcher = Fetcher(source, sleep=sleep)
    map_item = item_mapper(source)
    fetched_before = run["fetched"]  # by an earlier invocation of a resumed run: not in this one's rate
    while True:
        page_no = run["pages"] + 1
        request = request_at(source, run["next"], run["since"])
        try:
            page = fetcher.fetch(request, page_no)
            check_page(source, page)
            items = resolve_all(page.document, source.records)
            if items is None:
                items = []  # an empty FHIR Bundle has no `entry` at all
            if not isinstance(items, list):
                raise UpstreamError("`records` does not lead to a list in this page", retryable=False)
            position = next_position(source, page, request)
            if position is not None and position == run["next"]:
                raise UpstreamError("the upstream's next page is the page just read", retryable=False)
        except UpstreamError as exc:
            return f"page {page_no}: {exc}"
        moment = now()
        accepted, failures, watermark = [], [], run["run_watermark"]
        for index, item in enumerate(items):
            record, test_id, problem = record_of(item, map_item, moment)
            if problem:
                failures.append({"page": page_no, "index": index, "test_id": test_id, "detail": problem})
            else:
                accepted.append((index, record))
            watermark = larger(watermark, _watermark_value(item, source))
        if dry_run:
            run.update(pages=page_no, next=position, run_watermark=watermark, complete=position is None,
                       fetched=run["fetched"] + len(items), failed=run["failed"] + len(failures),
                       failures=(run["failures"] + failures)[:MAX_FAILURES])
        else:
            try:
                run.update(store.import_page(
                    source.name, accepted,
                    {"page": page_no, "next": position, "since": run["since"], "fetched": len(items),
                     "failures": failures, "watermark": watermark},
                    request_id=run["request_id"], key_id=f"import:{source.name}", now=utc_millis(moment)))
            except (ImportConflict, StoreError) as exc:
                log.warning("page not stored", extra={"page": page_no, "reason": str(exc)})
                return f"page {page_no} not stored: {exc}"
        bar.update(run["fetched"] - fetched_before, f"page {run['pages']:,}")
        if position is None:
            return None
