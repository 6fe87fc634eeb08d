"""`python -m records_service trace`: one request's log lines as a readable timeline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from records_service.trace import entries_of, timeline
from tests.live import REPO


def line(ts, message, request_id="r-1", **extra) -> str:
    return json.dumps({"ts": ts, "level": "INFO", "logger": "records_service.store", "message": message,
                       "request_id": request_id, **extra})


LOG = [
    "[2025-06-01 12:00:00 +0000] [7] [INFO] Booting worker with pid: 7 (not JSON, mentions r-1)",
    line("2025-06-01T12:00:00.250Z", "request completed", method="PUT", path="/tests/T 1", status=200),
    line("2025-06-01T12:00:00.100Z", "committed", test_id="T1", version=2, action="correct"),
    line("2025-06-01T12:00:00.100Z", "committed", request_id="r-10", test_id="T9", version=1),
    json.dumps(["r-1"]),
    json.dumps({"message": "no request id here, but r-1 in the text"}),
    '{"ts": "2025-06-01T12:00:00.300Z", "request_id": "r-1", "message": "cut sho',
    "",
]


def test_only_the_requests_own_json_lines_are_kept():
    entries = entries_of(LOG, "r-1")
    assert [(e["message"], e["request_id"]) for e in entries] == [("request completed", "r-1"), ("committed", "r-1")]


def test_the_timeline_is_in_time_order_with_offsets_and_fields():
    assert timeline(entries_of(LOG, "r-1"), "r-1") == [
        "request r-1: 2 log lines, 150 ms",
        "2025-06-01T12:00:00.100Z      +0 ms  INFO     records_service.store: committed"
        "  test_id=T1 version=2 action=correct",
        "2025-06-01T12:00:00.250Z    +150 ms  INFO     records_service.store: request completed"
        '  method=PUT path="/tests/T 1" status=200',
    ]


def test_a_traceback_is_indented_under_its_line_and_odd_entries_still_show():
    entries = [{"request_id": "r", "message": "no time"},
               {"ts": "2025-06-01T12:00:00.000Z", "level": "ERROR", "logger": "x", "message": "boom", "request_id": "r",
                "exc_info": "Traceback (most recent call last):\nValueError: bad"}]
    assert timeline(entries, "r") == [
        "request r: 2 log lines, 0 ms",
        "-          ?  -        -: no time",
        "2025-06-01T12:00:00.000Z      +0 ms  ERROR    x: boom",
        "    Traceback (most recent call last):",
        "    ValueError: bad",
    ]


def test_no_entries_make_no_timeline():
    assert timeline(entries_of(LOG, "r-2"), "r-2") == []


def trace(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "records_service", "trace", *args], input=stdin, cwd=REPO,
                          capture_output=True, text=True, timeout=30)


def test_the_command_reads_standard_input():
    result = trace("r-1", stdin="\n".join(LOG))
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == "request r-1: 2 log lines, 150 ms"


def test_the_command_merges_files_in_time_order_and_says_when_one_cannot_be_read(tmp_path):
    (tmp_path / "a.log").write_text(line("2025-06-01T12:00:00.300Z", "later") + "\n")
    (tmp_path / "b.log").write_bytes(line("2025-06-01T12:00:00.100Z", "earlier").encode() + b"\n\xff\xfe junk\n")
    result = trace("r-1", str(tmp_path / "a.log"), str(tmp_path / "missing.log"), str(tmp_path / "b.log"))
    assert [l.split(": ", 1)[1] for l in result.stdout.splitlines()[1:]] == ["earlier", "later"]
    assert "missing.log" in result.stderr
    assert result.returncode == 2


@pytest.mark.parametrize("stdin", ["", "not json at all\n", line("2025-06-01T12:00:00.100Z", "x", request_id="r-12")])
def test_the_command_exits_1_when_the_request_left_no_lines(stdin):
    result = trace("r-1", stdin=stdin)
    assert result.returncode == 1 and result.stdout == ""
    assert "no log lines for request r-1" in result.stderr


def test_a_reader_that_stops_early_is_not_an_error(tmp_path):
    log = tmp_path / "big.log"
    log.write_text("".join(line(f"2025-06-01T12:00:{i % 60:02d}.000Z", "x" * 100) + "\n" for i in range(5000)))
    proc = subprocess.Popen([sys.executable, "-m", "records_service", "trace", "r-1", str(log)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"request r-1: 5000 log lines")
    proc.stdout.close()  # as `| head -1` does, long before the 5000 lines (~700 KB) are written
    assert proc.wait(30) == 0
    assert proc.stderr.read() == b""
