"""The JSON log line: its fields, its timestamp, and values JSON has no type for."""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import date

from records_service.logs import JsonFormatter, key_id_var, request_id_var


def formatted(message: str, *args, created: float, **extra) -> dict:
    record = logging.LogRecord("records_service.store", logging.INFO, "", 0, message, args, None)
    record.created, record.msecs = created, (created - int(created)) * 1000
    record.__dict__.update(extra)
    return json.loads(JsonFormatter().format(record))


def test_a_line_carries_time_level_logger_message_and_its_extras():
    assert formatted("committed %s", "now", created=1748779199.9996, test_id="T1", version=1) == {
        "ts": "2025-06-01T11:59:59.999Z", "level": "INFO", "logger": "records_service.store",
        "message": "committed now", "test_id": "T1", "version": 1}


def test_lines_in_different_seconds_each_get_their_own_second():
    stamps = [formatted("x", created=t)["ts"] for t in (1748779199.5, 1748779200.0, 1748779199.25, 86400.001)]
    assert stamps == ["2025-06-01T11:59:59.500Z", "2025-06-01T12:00:00.000Z", "2025-06-01T11:59:59.250Z",
                      "1970-01-02T00:00:00.001Z"]


def test_the_request_and_key_of_the_context_are_on_the_line():
    def in_request() -> dict:
        request_id_var.set("r-1")
        key_id_var.set("k-1")
        return formatted("x", created=0.0)

    line = contextvars.copy_context().run(in_request)
    assert (line["request_id"], line["key_id"]) == ("r-1", "k-1")
    assert "request_id" not in formatted("x", created=0.0)


def test_a_value_json_cannot_hold_is_written_as_text_and_non_ascii_as_itself():
    line = formatted("Prüfung", created=0.0, day=date(2025, 6, 1))
    assert (line["message"], line["day"]) == ("Prüfung", "2025-06-01")
    record = logging.LogRecord("x", logging.INFO, "", 0, "Prüfung", (), None)
    assert "Prüfung" in JsonFormatter().format(record)
