"""Our service with each write in a transaction of its own, as before group commit, for
`bench_core.py --ours-app` (bench only): the same app, but `Database.write` takes the writers'
turn, begins and commits once per write instead of once per group of waiting writes.

    .venv/bin/python bench/bench_core.py --scenarios POST --no-auth-compare --no-synchronous-compare \
        --ours-app 'one_commit_per_write_app:create_app()'
"""

from common import write_alone  # common puts the repository on sys.path
from records_service.app import create_app
from records_service.store.sqlite.connection import Database

__all__ = ["create_app"]  # the factory --ours-app names

Database.write = write_alone
