"""records_service: ingest and query medical test results over HTTP."""

__version__ = "0.2.0"
