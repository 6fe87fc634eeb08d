"""Request context (correlation ID, clock, response headers, completion line), then authentication."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import time
import uuid

import falcon
import falcon.inspect

from .access import ANONYMOUS, BROWSER_ROUTES, PUBLIC, ROUTE_ROLES, UNRESTRICTED, Principal
from .errors import Problem
from .keys import KeyRejected, authenticate
from .logs import key_id_var, request_id_var

log = logging.getLogger("records_service.http")
access_log = logging.getLogger("records_service.access")

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
        req.context.key_log_token = key_id_var.set(None)  # Authenticate fills it in
        log.debug("request received", extra={"method": req.method, "path": req.path})

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        try:
            duration_ms = round((time.perf_counter() - req.context.started) * 1000, 3)
            resp.set_header("X-Request-ID", req.context.request_id)
            resp.set_header("Server-Timing", f"app;dur={duration_ms}")
            _allow_options_too(req, resp)
            log.info("request completed", extra={
                "method": req.method, "path": req.path, "status": resp.status_code, "duration_ms": duration_ms,
                "pid": os.getpid(),  # which worker served it
                **getattr(req.context, "log_fields", {}),
            })
        finally:
            key_id_var.reset(req.context.key_log_token)
            request_id_var.reset(req.context.log_token)


def _allow_options_too(req: falcon.Request, resp: falcon.Response) -> None:
    """Falcon's own OPTIONS answer leaves OPTIONS out of its Allow, while its 405 lists it: make
    the OPTIONS answer list it too, so both say the same."""
    allow = resp.get_header("Allow")
    if req.method == "OPTIONS" and resp.status_code == 200 and allow and "OPTIONS" not in allow.split(", "):
        resp.set_header("Allow", f"{allow}, OPTIONS")


class Authenticate:
    """Access control, in this one place: who is asking (API key), and may they use this route.

    Runs after RequestContext, so a refusal still carries the request ID and gets its
    completion line. The role a request needs comes from access.ROUTE_ROLES by the template
    of the route it reached (`req.uri_template`), never by how its path is spelled. Keys are
    looked up on every request, so a revocation holds from the next request in every worker.
    """

    def __init__(self, store, *, required: bool) -> None:
        self._store = store
        self._required = required
        self._falcon_defaults: dict[str, frozenset[str]] = {}

    def learn_routes(self, app: falcon.App) -> None:
        """Note each route's methods that only Falcon answers (405 with Allow, OPTIONS): they
        need no key, so a method a route does not serve stays a 405. Call after the last
        add_route; until then every method of every route needs a rule, as a served one does."""
        for route in falcon.inspect.inspect_routes(app):
            self._falcon_defaults[route.path] = frozenset(m.method for m in route.methods if m.internal)
            unruled = [m.method for m in route.methods
                       if not m.internal and m.method not in ROUTE_ROLES.get(route.path, {})]
            if unruled:
                access_log.error("route has no access rule: refused to every key",
                                 extra={"route": route.path, "methods": unruled})

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.principal = ANONYMOUS if self._required else UNRESTRICTED

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource, params) -> None:
        if not self._required:
            return
        template, method = req.uri_template, req.method
        needed = ROUTE_ROLES.get(template, {}).get(method)
        if needed == PUBLIC or method in self._falcon_defaults.get(template, ()):
            return
        principal = self._authenticate(req, browser=template in BROWSER_ROUTES)
        req.context.principal = principal
        key_id_var.set(principal.key_id)
        if needed is None:
            access_log.error("access denied", extra={"reason": "no-access-rule", "method": method, "route": template})
            raise Problem(403, "no-access-rule", f"{method} {template} has no access rule, so no key may use it",
                          title="Forbidden")
        if not principal.may(needed):
            access_log.warning("access denied",
                               extra={"reason": "role", "needs": needed, "method": method, "route": template})
            raise Problem(403, "forbidden-role", f"{method} {template} needs a key with the {needed} role",
                          title="Forbidden")

    def _authenticate(self, req: falcon.Request, browser: bool) -> Principal:
        try:
            return authenticate(self._store, presented_key(req.get_header("Authorization"), basic=browser))
        except KeyRejected as exc:
            known = {"key_id": exc.key_id} if exc.key_id else {}
            access_log.warning("authentication failed",
                               extra={"reason": exc.reason, **known, "method": req.method, "path": req.path})
            raise unauthorized(exc.reason, browser=browser) from None


def presented_key(header: str | None, *, basic: bool) -> str:
    """The key in an Authorization header: `Bearer <key>`, or with `basic`, the password of
    HTTP Basic (any user name). KeyRejected when there is none or the header is malformed;
    its content is never logged or echoed, as it may be a secret."""
    if header is None or not header.strip():
        raise KeyRejected("missing-key")
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if not value and scheme.lower() not in ("bearer", "basic"):
        raise KeyRejected("missing-scheme")  # a bare key, or one glued to its scheme
    if scheme.lower() not in ("bearer", "basic") or (scheme.lower() == "basic" and not basic):
        raise KeyRejected("unsupported-scheme")
    if basic and scheme.lower() == "basic" and value:
        try:
            user_password = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise KeyRejected("malformed-header") from None
        _, colon, password = user_password.partition(":")
        if colon:
            return password
    raise KeyRejected("malformed-header")


_UNAUTHORIZED_DETAILS = {
    "missing-key": "this endpoint needs an API key: send Authorization: Bearer <key>",
    "missing-scheme": "the Authorization header has no scheme before the key: send Authorization: Bearer <key>",
    "unsupported-scheme": "the Authorization scheme must be Bearer: send Authorization: Bearer <key>",
}


def unauthorized(reason: str, *, browser: bool) -> Problem:
    """401 with the challenge a client can answer: Basic for the dashboard (a browser then asks
    for the key), Bearer for the API (RFC 6750: `invalid_token` once a key was presented), and
    a detail that says what to fix in the header when its form is what is wrong."""
    missing = reason == "missing-key"
    if browser:
        challenge = 'Basic realm="records_service"'
    else:
        challenge = "Bearer" if missing else 'Bearer error="invalid_token"'
    detail = _UNAUTHORIZED_DETAILS.get(reason, "the API key is not valid: it is malformed, unknown or revoked")
    if browser:
        detail += " (a browser may send the admin key as the password of HTTP Basic auth)"
    return Problem(401, "unauthorized", detail, title="Unauthorized", headers={"WWW-Authenticate": challenge})
