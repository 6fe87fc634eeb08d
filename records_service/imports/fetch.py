"""Fetching one page of JSON from an upstream, patiently and safely (stdlib urllib only).

A page is tried up to `retries` times when the upstream times out, cannot be reached, answers
429 or 5xx, or sends something that is not a JSON document within the bounds (too large, not
JSON, nested too deeply): `Retry-After` on 429/503 is honoured (up to MAX_RETRY_AFTER_S), other
waits back off exponentially. Requests are spaced to at most `rate` per second. Another 4xx or
a redirect to another origin fails the page at once. Header values (tokens) are never put in
a message or a log line: requests are described by the URL's origin and path only.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from .. import __version__
from ..validate import MalformedJSON, parse_json
from .source import Source

log = logging.getLogger("records_service.import")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_RETRY_AFTER_S = 300.0
READ_CHUNK_BYTES = 256 * 1024
_RETRY_AFTER_STATUSES = (429, 503)


class UpstreamError(Exception):
    """A page that could not be read; str() is safe to print and log (no header values)."""

    def __init__(self, reason: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class PageRequest:
    url: str
    body: bytes | None = None  # a JSON body to POST (GraphQL); None for GET


@dataclass(frozen=True)
class Page:
    document: Any
    headers: Mapping[str, str] = field(repr=False)  # the response's headers, names lower-cased
    size: int


def where(url: str) -> str:
    """A URL as logs and messages show it: origin and path, without the query (which may carry
    anything the upstream put there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only within the origin asked: the source's headers (its token) must not
    travel to another host, and never to a scheme other than http or https."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not same_origin(req.full_url, newurl):
            raise UpstreamError(f"{where(req.full_url)} redirected to another origin ({where(newurl)}); "
                                "not followed", retryable=False)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds to wait (RFC 9110: delay-seconds or an HTTP-date), bounded."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - now).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class Fetcher:
    """Fetches pages for one source. Holds the pacing state (when the next request may start)."""

    def __init__(self, source: Source, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._sleep = sleep
        self._clock = clock
        self._next_start = clock()
        self._opener = urllib.request.build_opener(_SameOriginRedirects())

    def fetch(self, request: PageRequest, page: int) -> Page:
        """The page's parsed JSON, after up to `retries` tries; UpstreamError when it cannot be had."""
        tries = self._source.retries
        for attempt in range(1, tries + 1):
            try:
                return self._once(request, page)
            except UpstreamError as exc:
                if not exc.retryable or attempt == tries:
                    log.warning("page not read", extra={"page": page, "tries": attempt, "reason": str(exc)})
                    raise
                wait = exc.retry_after if exc.retry_after is not None else \
                    min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_MAX_S)
                log.warning("upstream retry", extra={"page": page, "attempt": attempt + 1, "of": tries,
                                                     "wait_s": round(wait, 3), "reason": str(exc)})
                self._sleep(wait)
        raise AssertionError("unreachable: retries is at least 1")

    def _pace(self) -> None:
        wait = self._next_start - self._clock()
        if wait > 0:
            self._sleep(wait)
        self._next_start = max(self._clock(), self._next_start) + 1 / self._source.rate

    def _once(self, request: PageRequest, page: int) -> Page:
        self._pace()
        headers = {"Accept": "application/json", "User-Agent": f"records_service/{__version__} import",
                   **self._source.headers}
        if request.body is not None:
            headers["Content-Type"] = "application/json"
        http_request = urllib.request.Request(request.url, data=request.body, headers=headers,
                                              method="GET" if request.body is None else "POST")
        started = self._clock()
        try:
            with self._opener.open(http_request, timeout=self._source.timeout) as response:
                body = self._read(response, started)
                status, response_headers = response.status, {k.lower(): v for k, v in response.getheaders()}
        except urllib.error.HTTPError as exc:
            exc.close()
            status = exc.code
            retryable = status == 429 or status >= 500
            retry_after = (retry_after_seconds(exc.headers.get("Retry-After"), datetime.now(timezone.utc))
                           if status in _RETRY_AFTER_STATUSES else None)
            raise UpstreamError(f"{where(request.url)} answered {status}", retryable=retryable,
                                retry_after=retry_after) from None
        except urllib.error.URLError as exc:
            raise UpstreamError(f"{where(request.url)}: {_reason(exc.reason)}", retryable=True) from None
        except (TimeoutError, socket.timeout):
            raise UpstreamError(f"{where(request.url)}: timed out after {self._source.timeout:g}s",
                                retryable=True) from None
        except (ValueError, http.client.InvalidURL) as exc:  # a URL http.client cannot send: nothing was sent
            raise UpstreamError(f"{where(request.url)}: cannot be requested ({type(exc).__name__})",
                                retryable=False) from None
        except (OSError, http.client.HTTPException) as exc:
            raise UpstreamError(f"{where(request.url)}: {_reason(exc)}", retryable=True) from None
        try:
            document = parse_json(body, "the page")
        except MalformedJSON as exc:
            raise UpstreamError(f"{where(request.url)}: {exc}", retryable=True) from None
        log.info("page fetched", extra={"page": page, "url": where(request.url), "status": status,
                                        "bytes": len(body), "ms": round((self._clock() - started) * 1000)})
        return Page(document, response_headers, len(body))

    def _read(self, response, started: float) -> bytes:
        """The body, at most max_page_bytes, within `timeout` in all (a trickle cannot hold a run)."""
        limit = self._source.max_page_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise UpstreamError(f"the page is larger than {limit} bytes ({declared})", retryable=True)
        chunks, size = [], 0
        while chunk := response.read(READ_CHUNK_BYTES):
            size += len(chunk)
            if size > limit:
                raise UpstreamError(f"the page is larger than {limit} bytes", retryable=True)
            if self._clock() - started > self._source.timeout:
                raise TimeoutError()
            chunks.append(chunk)
        return b"".join(chunks)


def _reason(reason: Any) -> str:
    """Why a connection failed, in words: no header, body or traceback."""
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    if isinstance(reason, str):
        return reason
    return type(reason).__name__
