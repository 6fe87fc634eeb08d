"""Small real HTTP upstreams on loopback for the import tests: no mock of urllib anywhere.

`Upstream` is a threaded `http.server` that answers through a handler function, keeps a log of
every request it received, and plays scripted faults first (a status with headers, a hang
before answering, a body that is not JSON). The shapes in `rest_link_pages`, `rest_body_pages`,
`graphql_pages` and `fhir_pages` page a list of items as real APIs do.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str           # with its query
    headers: dict       # names lower-cased
    body: bytes
    at: float = field(default_factory=time.monotonic)  # when it arrived

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def json(self):
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict | list = b""
    headers: dict = field(default_factory=dict)
    hang_s: float = 0.0   # sleep this long before answering (a hung upstream)
    chunked: bool = False  # send the body chunked, without a Content-Length

    def encoded(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


class Upstream:
    """A threaded HTTP server on 127.0.0.1 and a free port; use as a context manager."""

    def __init__(self, handler: Callable[[Seen], Reply]) -> None:
        self.handler = handler
        self.requests: list[Seen] = []
        self.faults: list[Reply] = []   # answered first, in order, one per request
        self.down: Reply | None = None  # when set, every request gets this
        self._lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                            self.rfile.read(length))
                with upstream._lock:
                    upstream.requests.append(seen)
                    reply = upstream.down or (upstream.faults.pop(0) if upstream.faults else None)
                reply = reply or upstream.handler(seen)
                if reply.hang_s:
                    time.sleep(reply.hang_s)
                body = reply.encoded()
                try:
                    self.send_response(reply.status)
                    headers = {"Content-Type": "application/json", **reply.headers}
                    for name, value in headers.items():
                        self.send_header(name, value)
                    if reply.chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        for start in range(0, len(body), 4096):
                            chunk = body[start:start + 4096]
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.write(b"0\r\n\r\n")
                    else:
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (it timed out): nothing to answer

            do_GET = do_POST = _serve

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "Upstream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def paths(self) -> list[str]:
        return [seen.path for seen in self.requests]


def _page_number(seen: Seen) -> int:
    return int(seen.query.get("page", "1"))


def _since_filter(items: list[dict], seen_since: str | None, key: str | None) -> list[dict]:
    if not seen_since or key is None:
        return items
    return [item for item in items if str(item[key]) > seen_since]


def rest_link_pages(items: list[dict], per_page: int, *, watermark_key: str | None = None,
                    path: str = "/results") -> Callable[[Seen], Reply]:
    """A plain REST list: the page is a JSON array, `Link: <...>; rel="next"` to the next one.
    With `watermark_key`, `?since=` keeps only items whose key is larger (the API's own filter)."""

    def handle(seen: Seen) -> Reply:
        since = seen.query.get("since")
        chosen = _since_filter(items, since, watermark_key)
        page = _page_number(seen)
        body = chosen[(page - 1) * per_page:page * per_page]
        headers = {}
        if page * per_page < len(chosen):
            headers["Link"] = f'<{path}?since={since or ""}&page={page + 1}>; rel="next", <{path}>; rel="first"'
        return Reply(200, body, headers)

    return handle


def rest_body_pages(items: list[dict], per_page: int, base: str) -> Callable[[Seen], Reply]:
    """A REST API with the next page's absolute URL in the body: {"data": [...], "meta": {"next": url|null}}."""

    def handle(seen: Seen) -> Reply:
        page = _page_number(seen)
        more = page * per_page < len(items)
        return Reply(200, {"data": items[(page - 1) * per_page:page * per_page],
                           "meta": {"next": f"{base}/v2/results?page={page + 1}" if more else None}})

    return handle


def graphql_pages(items: list[dict], per_page: int) -> Callable[[Seen], Reply]:
    """A GraphQL connection: cursors are opaque strings, `pageInfo { endCursor hasNextPage }`."""

    def handle(seen: Seen) -> Reply:
        variables = seen.json()["variables"]
        start = int(variables["after"].removeprefix("c")) if variables["after"] else 0
        nodes = items[start:start + per_page]
        end = start + len(nodes)
        return Reply(200, {"data": {"results": {"nodes": nodes, "pageInfo": {
            "endCursor": f"c{end}", "hasNextPage": end < len(items)}}}})

    return handle


def fhir_pages(observations: list[dict], per_page: int, base: str) -> Callable[[Seen], Reply]:
    """A FHIR R4 search: a Bundle of type searchset, entries with `resource`, `link` with relation next."""

    def handle(seen: Seen) -> Reply:
        offset = int(seen.query.get("_getpagesoffset", "0"))
        chosen = observations[offset:offset + per_page]
        links = [{"relation": "self", "url": f"{base}/fhir/Observation?_getpagesoffset={offset}"}]
        if offset + per_page < len(observations):
            links.append({"relation": "next",
                          "url": f"{base}/fhir/Observation?_getpagesoffset={offset + per_page}&_count={per_page}"})
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(observations), "link": links,
                  "entry": [{"fullUrl": f"{base}/fhir/Observation/{o['id']}", "resource": o,
                             "search": {"mode": "match"}} for o in chosen]}
        if not chosen:
            del bundle["entry"]  # FHIR leaves out an empty list
        return Reply(200, bundle, {"Content-Type": "application/fhir+json"})

    return handle
