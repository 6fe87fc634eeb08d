"""Request context: the correlation ID, the clock, the response headers and the completion line."""

from __future__ import annotations

import logging
import re
import time
import uuid

import falcon

from .access import UNRESTRICTED
from .logs import request_id_var

log = logging.getLogger("records_service.http")

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}", re.ASCII)


def accept_request_id(value: str | None) -> str:
    """The client's X-Request-ID when well formed, otherwise a fresh UUID4."""
    if value is not None and _REQUEST_ID_RE.fullmatch(value):
        return value
    return str(uuid.uuid4())


class RequestContext:
    """Outermost middleware: every request gets an ID, every response carries it back."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()
        req.context.request_id = accept_request_id(req.get_header("X-Request-ID"))
        req.context.log_token = request_id_var.set(req.context.request_id)
        req.context.principal = UNRESTRICTED
        log.debug("request received", extra={"method": req.method, "path": req.path})

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        try:
            duration_ms = round((time.perf_counter() - req.context.started) * 1000, 3)
            resp.set_header("X-Request-ID", req.context.request_id)
            resp.set_header("Server-Timing", f"app;dur={duration_ms}")
            log.info("request completed", extra={
                "method": req.method, "path": req.path, "status": resp.status_code, "duration_ms": duration_ms,
                **getattr(req.context, "log_fields", {}),
            })
        finally:
            request_id_var.reset(req.context.log_token)
