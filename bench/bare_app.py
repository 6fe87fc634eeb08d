"""The bare Falcon app the benchmark compares records_service with.

Same routes and the same answer sizes as ours, none of the work: POST /tests reads the request
body and answers 201 with one pre-built stored record; GET /tests answers 200 with a pre-built
100-record clinic page. No validation, no database, no logging, no middleware.

Body sizes: `BENCH_POST_BODY_BYTES` and `BENCH_GET_BODY_BYTES` (set by bench_core.py to what
our service actually answered) make the constant bodies exactly that many bytes; without them
the bodies are a representative record / page from records_gen, built the way the benchmark
builds its records (`BENCH_GET_RECORDS` records a page, default 100).

    gunicorn -c gunicorn.conf.py --pythonpath bench -b 127.0.0.1:8001 'bare_app:create_app()'
"""

from __future__ import annotations

import os

import falcon

import records_gen


def _size(name: str) -> int | None:
    raw = os.environ.get(name)
    return int(raw) if raw else None


class Tests:
    def __init__(self, post_body: bytes, get_body: bytes) -> None:
        self._post_body = post_body
        self._get_body = get_body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.bounded_stream.read()  # a real handler has to take the request body off the socket
        resp.status = falcon.HTTP_201
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._post_body

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._get_body


class Health:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = b'{"status": "ok"}'


def create_app() -> falcon.App:
    post_body = records_gen.representative_post_body(_size("BENCH_POST_BODY_BYTES"))
    get_body = records_gen.representative_get_body(_size("BENCH_GET_BODY_BYTES"),
                                                   _size("BENCH_GET_RECORDS") or records_gen.RECORDS_PER_CLINIC)
    app = falcon.App()
    app.add_route("/tests", Tests(post_body, get_body))
    app.add_route("/health", Health())
    return app
