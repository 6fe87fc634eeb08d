"""Fetching pages from real upstreams on loopback: retries, waits, bounds, secrecy, paging."""

import json
import logging
import time

import pytest

from records_service.imports.fetch import Fetcher, Page, PageRequest, UpstreamError, retry_after_seconds
from records_service.imports.paging import check_page, link_next, next_position, request_at
from records_service.imports.source import parse_source
from tests.upstream import Reply, Upstream

TOKEN = "tok-9f2c1d"
FIELDS = {"test_id": "id", "clinic_id": {"value": "C001"}, "patient_id": "p", "test_type": "t",
          "result": "v", "collected_at": "c"}


def source_for(upstream: Upstream, **options):
    doc = {"name": "lab", "kind": "rest", "url": upstream.url("/results"), "fields": FIELDS,
           "headers": {"Authorization": "Bearer ${TOKEN}"}, "rate": 1000, **options}
    return parse_source(doc, {"TOKEN": TOKEN})


def ok(seen):
    return Reply(200, [{"id": "x"}])


class Sleeps(list):
    """Records each wait and really waits it."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        time.sleep(seconds)


def test_500_twice_then_200_is_retried_with_backoff_and_sends_the_headers():
    with Upstream(ok) as upstream:
        upstream.faults = [Reply(500), Reply(502)]
        sleeps = Sleeps()
        page = Fetcher(source_for(upstream, retries=3), sleep=sleeps).fetch(PageRequest(upstream.url("/results")), 1)
    assert page.document == [{"id": "x"}]
    assert len(upstream.requests) == 3
    assert sleeps == [0.5, 1.0]
    assert all(seen.headers["authorization"] == f"Bearer {TOKEN}" for seen in upstream.requests)


def test_429_with_retry_after_waits_at_least_that_long():
    with Upstream(ok) as upstream:
        upstream.faults = [Reply(429, headers={"Retry-After": "1"})]
        Fetcher(source_for(upstream, retries=2)).fetch(PageRequest(upstream.url("/results")), 1)
    first, second = upstream.requests
    assert second.at - first.at >= 1.0


def test_a_request_that_hangs_past_the_timeout_is_retried():
    with Upstream(ok) as upstream:
        upstream.faults = [Reply(200, [{"id": "late"}], hang_s=3)]
        started = time.monotonic()
        page = Fetcher(source_for(upstream, retries=2, timeout=0.5)).fetch(PageRequest(upstream.url("/results")), 1)
        elapsed = time.monotonic() - started
    assert page.document == [{"id": "x"}]
    assert len(upstream.requests) == 2
    assert elapsed < 2.5  # the hung answer was not waited for


def test_an_upstream_down_past_its_retries_fails_the_page():
    with Upstream(ok) as upstream:
        upstream.down = Reply(503)
        with pytest.raises(UpstreamError, match="answered 503") as raised:
            Fetcher(source_for(upstream, retries=2), sleep=lambda s: None).fetch(PageRequest(upstream.url("/r")), 1)
    assert raised.value.retryable and len(upstream.requests) == 2


def test_a_client_error_is_not_retried():
    with Upstream(ok) as upstream:
        upstream.down = Reply(401, {"error": "bad token"})
        with pytest.raises(UpstreamError, match="answered 401"):
            Fetcher(source_for(upstream, retries=4), sleep=lambda s: None).fetch(PageRequest(upstream.url("/r")), 1)
    assert len(upstream.requests) == 1


def test_a_refused_connection_fails_after_its_retries():
    with Upstream(ok) as upstream:
        source = source_for(upstream, retries=2)
    with pytest.raises(UpstreamError, match="connection refused"):
        Fetcher(source, sleep=lambda s: None).fetch(PageRequest(source.url), 1)


@pytest.mark.parametrize("reply, message", [
    (Reply(200, b"<html>gateway</html>"), "the page is not valid JSON"),
    (Reply(200, b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    (Reply(200, b'{"data": [' + b'"x", ' * 400_000 + b'"x"]}'), "larger than 1048576 bytes"),
    (Reply(200, b"\xff\xfe"), "not valid UTF-8"),
    (Reply(200, b""), "is empty"),
])
def test_a_page_that_is_not_acceptable_json_fails_like_an_unreadable_upstream(reply, message):
    with Upstream(lambda seen: reply) as upstream:
        with pytest.raises(UpstreamError, match=message):
            Fetcher(source_for(upstream, retries=1, max_page_bytes=1 << 20)).fetch(
                PageRequest(upstream.url("/results")), 1)


def test_a_chunked_body_larger_than_the_bound_is_cut_short():
    """The bound holds while reading, not only against a declared Content-Length."""
    with Upstream(lambda seen: Reply(200, b"[" + b"1," * 50_000 + b"1]", chunked=True)) as upstream:
        with pytest.raises(UpstreamError, match="larger than 2048 bytes$"):
            Fetcher(source_for(upstream, retries=1, max_page_bytes=2048)).fetch(PageRequest(upstream.url("/r")), 1)
        page = Fetcher(source_for(upstream, retries=1)).fetch(PageRequest(upstream.url("/r")), 1)
    assert len(page.document) == 50_001


def test_a_redirect_to_another_origin_is_not_followed():
    with Upstream(ok) as other, Upstream(lambda seen: Reply(302, headers={"Location": other.url("/steal")})) as up:
        with pytest.raises(UpstreamError, match="redirected to another origin"):
            Fetcher(source_for(up, retries=1)).fetch(PageRequest(up.url("/results")), 1)
    assert other.requests == []


@pytest.mark.parametrize("path", ["/a b", "/caf\u00e9", "/x\r\nX-Injected: 1"])
def test_a_next_url_that_cannot_be_sent_fails_the_page_without_a_traceback(path):
    with Upstream(ok) as upstream:
        with pytest.raises(UpstreamError, match="cannot be requested"):
            Fetcher(source_for(upstream, retries=3)).fetch(PageRequest(upstream.url(path)), 2)
    assert upstream.requests == []


def test_requests_are_spaced_by_the_rate():
    with Upstream(ok) as upstream:
        fetcher = Fetcher(source_for(upstream, rate=10))
        started = time.monotonic()
        for page in range(1, 6):
            fetcher.fetch(PageRequest(upstream.url("/results")), page)
        elapsed = time.monotonic() - started
    assert elapsed >= 0.4  # five requests at ten a second: four gaps of 0.1 s


def test_header_values_appear_in_no_error_and_no_log_line(caplog):
    caplog.set_level(logging.DEBUG)
    with Upstream(ok) as upstream:
        upstream.faults = [Reply(500, {"echo": TOKEN}), Reply(200, b"not json " + TOKEN.encode())]
        with pytest.raises(UpstreamError) as raised:
            Fetcher(source_for(upstream, retries=2), sleep=lambda s: None).fetch(
                PageRequest(upstream.url(f"/results?q=1")), 1)
    assert TOKEN not in str(raised.value)
    assert caplog.records and not any(TOKEN in json.dumps(vars(r), default=str) for r in caplog.records)


def test_retry_after_as_seconds_or_a_date_is_bounded():
    from datetime import datetime, timezone
    now = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert retry_after_seconds("1", now) == 1
    assert retry_after_seconds("Sun, 01 Jun 2025 12:00:30 GMT", now) == 30
    assert retry_after_seconds("Sun, 01 Jun 2025 11:00:00 GMT", now) == 0
    assert retry_after_seconds("999999", now) == 300
    assert retry_after_seconds("soon", now) is None


# -- paging ----------------------------------------------------------------------------------

@pytest.mark.parametrize("header, expected", [
    ('<https://a/x?page=2>; rel="next"', "https://a/x?page=2"),
    ('<https://a/x?page=1>; rel="prev", <https://a/x?page=3>; rel="next"', "https://a/x?page=3"),
    ('<https://a/x?page=3>; rel=next', "https://a/x?page=3"),
    ('<https://a/x?a=1,2>; title="a, b; c"; rel="last next"', "https://a/x?a=1,2"),
    ('<https://a/x>; rel="nextish"', None),
    ('<https://a/x>; rel="prev"', None),
    ("", None),
    (None, None),
])
def test_link_next_reads_rfc_8288(header, expected):
    assert link_next(header) == expected


def test_rest_next_is_resolved_against_the_page_and_kept_on_the_origin():
    source = parse_source({"name": "l", "kind": "rest", "url": "http://lab.example/v1/r?since={since}",
                           "fields": FIELDS}, {})
    current = request_at(source, None, "2025-01-01T00:00:00+00:00")
    assert current.url == "http://lab.example/v1/r?since=2025-01-01T00%3A00%3A00%2B00%3A00"
    page = Page([], {"link": '</v1/r?page=2>; rel="next"'}, 2)
    assert next_position(source, page, current) == {"url": "http://lab.example/v1/r?page=2"}
    for target in ("http://evil.example/v1/r?page=2", "file:///etc/passwd", "https://lab.example/v1/r"):
        with pytest.raises(UpstreamError, match="not on the source's origin"):
            next_position(source, Page([], {"link": f"<{target}>; rel=next"}, 2), current)


def test_graphql_request_next_and_errors():
    source = parse_source({"name": "g", "kind": "graphql", "url": "http://g.example/graphql", "query": "{ q }",
                           "records": "data.r.nodes", "cursor": "data.r.pageInfo.endCursor",
                           "has_next": "data.r.pageInfo.hasNextPage", "fields": FIELDS}, {})
    first = request_at(source, None, "5")
    assert json.loads(first.body) == {"query": "{ q }", "variables": {"after": None, "since": "5"}}
    assert json.loads(request_at(source, {"after": "c9"}, "5").body)["variables"] == {"after": "c9", "since": "5"}
    more = Page({"data": {"r": {"pageInfo": {"endCursor": "c9", "hasNextPage": True}}}}, {}, 1)
    last = Page({"data": {"r": {"pageInfo": {"endCursor": "c9", "hasNextPage": False}}}}, {}, 1)
    assert next_position(source, more, first) == {"after": "c9"}
    assert next_position(source, last, first) is None
    with pytest.raises(UpstreamError, match="carries errors: Cannot query field") as raised:
        check_page(source, Page({"errors": [{"message": "Cannot query field 'x'"}], "data": None}, {}, 1))
    assert not raised.value.retryable
