"""Which page comes first and which comes next, for REST and GraphQL sources. Pure functions.

A position (where a run stands) is what `next_position` returns and the store keeps: for REST
`{"url": ...}`, for GraphQL `{"after": cursor}`; with the run's `since` it rebuilds the request.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping
from urllib.parse import quote, urljoin, urlsplit

from .fetch import Page, PageRequest, UpstreamError, same_origin, where
from .paths import resolve
from .source import Source

# One link-value of an RFC 8288 Link header: <target> then ;-separated parameters.
_LINK_RE = re.compile(r'\s*<([^>]*)>((?:\s*;\s*[^;,=\s]+(?:\s*=\s*(?:"[^"]*"|[^;,"\s]*))?)*)\s*(?:,|$)')
_PARAM_RE = re.compile(r';\s*([^;,=\s]+)(?:\s*=\s*(?:"([^"]*)"|([^;,"\s]*)))?')


def link_next(header: str | None) -> str | None:
    """The target of the first link whose rel (a space-separated list) holds `next`."""
    if not header:
        return None
    for match in _LINK_RE.finditer(header):
        for name, quoted, bare in _PARAM_RE.findall(match.group(2)):
            if name.lower() == "rel" and "next" in (quoted or bare).lower().split():
                return match.group(1)
    return None


def first_url(source: Source, since: str) -> str:
    return source.url.replace("{since}", quote(since, safe=""))


def request_at(source: Source, position: Mapping[str, Any] | None, since: str) -> PageRequest:
    """The request for a position (None: the first page of a run from `since`)."""
    if source.kind == "rest":
        return PageRequest(position["url"] if position else first_url(source, since))
    after = position["after"] if position else None
    body = {"query": source.query, "variables": {"after": after, "since": since}}
    return PageRequest(first_url(source, since), json.dumps(body).encode())


def check_page(source: Source, page: Page) -> None:
    """A GraphQL response carrying `errors` fails its page (not worth retrying: the upstream
    said what is wrong)."""
    if source.kind == "graphql" and isinstance(page.document, dict) and page.document.get("errors"):
        errors = page.document["errors"]
        first = errors[0] if isinstance(errors, list) and errors else errors
        message = first.get("message") if isinstance(first, dict) else None
        detail = f": {str(message)[:200]}" if message else ""
        raise UpstreamError(f"the GraphQL response carries errors{detail}", retryable=False)


def next_position(source: Source, page: Page, current: PageRequest) -> dict | None:
    """Where the page after `page` is, or None when it was the last. A next URL is resolved
    against the current one and must stay on the source's origin (its headers go with it)."""
    if source.kind == "graphql":
        more, cursor = resolve(page.document, source.has_next), resolve(page.document, source.cursor)
        return {"after": cursor} if more is True and cursor is not None else None
    target = link_next(page.headers.get("link")) if source.next is None else resolve(page.document, source.next)
    if target is None or target == "":
        return None
    if not isinstance(target, str):
        raise UpstreamError("the next page's URL is not a string", retryable=False)
    url = urljoin(current.url, target)
    if urlsplit(url).scheme not in ("http", "https") or not same_origin(url, source.url):
        raise UpstreamError(f"the next page's URL ({where(url)}) is not on the source's origin; not followed",
                            retryable=False)
    return {"url": url}
