"""Our service with POST /tests's SQL taken out, for `bench_core.py --ours-app` (bench only).

    .venv/bin/python bench/bench_core.py --scenarios POST --no-auth-compare --no-synchronous-compare \
        --ours-app 'without_sql_app:create_app()'

Store.insert builds the stored row (validated record, JSON, sort keys) and returns it without
writing: everything else a POST does (parsing, validation, access control, logging, the
response) is left as is, so the difference from the real service is what the write costs
under the same load, and this app's ratio to the bare one is the most the rest of the request
path allows. Nothing is stored: never point it at a database that matters.
"""

from records_service import store
from records_service.app import create_app
from records_service.store.sqlite import SQLiteStore

__all__ = ["create_app"]  # the factory --ours-app names


def _insert_without_sql(self, record: dict, *, request_id: str, key_id=None, now: str) -> str:
    self.open()  # open (and migrate) as the real insert does
    return store.prepare(record, request_id, now).doc


SQLiteStore.insert = _insert_without_sql
