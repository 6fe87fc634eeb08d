"""Who is asking, and which clinics they may see.

Every request carries a `Principal` on `req.context.principal`. Resources ask it about clinics
(`sees`), because only they know which clinic a body or a stored record belongs to; which role
a route needs is decided before the resource runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import Problem


@dataclass(frozen=True)
class Principal:
    key_id: str | None
    roles: frozenset[str]
    clinics: frozenset[str] | None  # None: every clinic

    def sees(self, clinic_id: str) -> bool:
        return self.clinics is None or clinic_id in self.clinics


# Access control is off (RECORDS_AUTH=disabled) or not yet decided: everything is allowed.
UNRESTRICTED = Principal(key_id=None, roles=frozenset({"admin"}), clinics=None)


def clinic_forbidden(clinic_id: str) -> Problem:
    return Problem(403, "forbidden-clinic", f"this key may not access clinic {clinic_id}", title="Forbidden")
