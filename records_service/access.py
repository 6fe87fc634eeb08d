"""Who is asking, which role each route needs, and which clinics a caller may see.

Every request carries a `Principal` on `req.context.principal`. Which role a route needs is
decided before the resource runs, from `ROUTE_ROLES` (middleware.Authenticate); resources
then ask the principal about clinics (`sees`), because only they know which clinic a body or
a stored record belongs to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import Problem

log = logging.getLogger("records_service.access")

PUBLIC = "public"  # needs no key

# Which role each route template and method needs; `admin` may do everything. A route or
# method missing here is refused to every key (deny by default), and a test fails on it.
# HEAD needs what GET needs (below): it answers the same headers.
_ROLES_BY_METHOD: dict[str, dict[str, str]] = {
    "/health": {"GET": PUBLIC},
    "/ready": {"GET": PUBLIC},
    "/openapi.json": {"GET": PUBLIC},
    "/": {"GET": "admin"},
    "/tests": {"POST": "ingest", "GET": "read"},
    "/tests/_batch": {"POST": "ingest"},
    "/tests/_export": {"GET": "read"},
    "/tests/_stats": {"GET": "read"},
    "/tests/{test_id}": {"GET": "read", "PUT": "ingest", "DELETE": "ingest"},
    "/tests/{test_id}/history": {"GET": "read"},
    "/audit/{request_id}": {"GET": "admin"},
}
ROUTE_ROLES: dict[str, dict[str, str]] = {
    template: {**methods, **({"HEAD": methods["GET"]} if "GET" in methods else {})}
    for template, methods in _ROLES_BY_METHOD.items()
}

# Pages for people: a browser can only send a key as the password of HTTP Basic auth.
BROWSER_ROUTES = frozenset({"/"})


@dataclass(frozen=True)
class Principal:
    key_id: str | None
    roles: frozenset[str]
    clinics: frozenset[str] | None  # None: every clinic

    def sees(self, clinic_id: str) -> bool:
        return self.clinics is None or clinic_id in self.clinics

    def may(self, role: str) -> bool:
        return role in self.roles or "admin" in self.roles


# Access control is off (RECORDS_AUTH=disabled): everything is allowed.
UNRESTRICTED = Principal(key_id=None, roles=frozenset({"admin"}), clinics=None)
# No key (yet): may do nothing, sees no clinic.
ANONYMOUS = Principal(key_id=None, roles=frozenset(), clinics=frozenset())


def clinic_forbidden(clinic_id: str) -> Problem:
    log.warning("access denied", extra={"reason": "other-clinic", "clinic_id": clinic_id})
    return Problem(403, "forbidden-clinic", f"this key may not access clinic {clinic_id}", title="Forbidden")
