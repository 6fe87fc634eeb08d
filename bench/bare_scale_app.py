"""The bare Falcon reference for bench_scale.py: bare_app plus the collection routes, with
constant answers of exactly the sizes records_service gave, and none of the work.

  GET  /tests           bare_app's page (BENCH_GET_BODY_BYTES, BENCH_GET_RECORDS)
  POST /tests/_batch    reads the body, answers BENCH_BATCH_BODY_BYTES
  GET  /tests/_export   streams BENCH_EXPORT_LINES lines of BENCH_EXPORT_LINE_BYTES each,
                        1,000 lines a chunk as ours does
  GET  /tests/_stats    answers BENCH_STATS_BODY_BYTES

    gunicorn -c gunicorn.conf.py --pythonpath bench -b 127.0.0.1:8001 'bare_scale_app:create_app()'
"""

from __future__ import annotations

import os

import falcon

import bare_app
import records_gen

NDJSON = "application/x-ndjson"


def _size(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def padded_json(size: int) -> bytes:
    """A JSON object of exactly `size` bytes (at least 12)."""
    body = b'{"pad": ""}'
    if size < len(body):
        raise ValueError(f"no JSON object this bare app makes is as small as {size} bytes")
    return b'{"pad": "' + b"x" * (size - len(body)) + b'"}'


class Constant:
    def __init__(self, body: bytes, status: str = falcon.HTTP_200) -> None:
        self._body = body
        self._status = status

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.bounded_stream.read()  # a real handler has to take the request body off the socket
        resp.status = self._status
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body


class Export:
    def __init__(self, line: bytes, lines: int) -> None:
        self._chunk = line * 1000
        self._lines = lines

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = NDJSON
        resp.stream = self._chunks()

    def _chunks(self):
        full, rest = divmod(self._lines, 1000)
        for _ in range(full):
            yield self._chunk
        yield self._chunk[:rest * (len(self._chunk) // 1000)]


def create_app() -> falcon.App:
    app = bare_app.create_app()
    app.add_route("/tests/_batch", Constant(padded_json(_size("BENCH_BATCH_BODY_BYTES", 50))))
    app.add_route("/tests/_stats", Constant(padded_json(_size("BENCH_STATS_BODY_BYTES", 600))))
    line = records_gen.representative_post_body(_size("BENCH_EXPORT_LINE_BYTES", 350) - 1) + b"\n"
    app.add_route("/tests/_export", Export(line, _size("BENCH_EXPORT_LINES", 100_000)))
    return app
