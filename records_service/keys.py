"""API keys: how a key is made, what is kept of it, and how a presented key is checked.

A key reads `rs_<key_id>_<secret>`. The key id is public (listings, logs) and lets the
service find the key, and name it in a log line, even when the secret is wrong. Only a hash
of the secret is stored; the secret itself exists once, in the output of `keys create`.

Checking a key reads it from the database on every request, without a cache: a revocation
is seen by the very next request in every worker. The stdlib only: `secrets`, `hashlib`, `hmac`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets

from .access import Principal

ROLES = ("ingest", "read", "admin")
TOKEN_PREFIX = "rs_"
KEY_ID_BYTES = 8     # 16 hex characters: public, only needs to be unique
SECRET_BYTES = 32    # 256 bits from the OS's CSPRNG: 43 url-safe characters
_TOKEN_RE = re.compile(r"rs_([0-9a-f]{16})_([A-Za-z0-9_-]{43})", re.ASCII)


class KeyRejected(Exception):
    """A presented key that does not authenticate; `reason` and `key_id` are safe to log."""

    def __init__(self, reason: str, key_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key_id = key_id


def hash_secret(secret: str) -> str:
    """The stored form of a secret: hex SHA-256.

    A slow, salted password hash (bcrypt, scrypt, PBKDF2) defends low-entropy secrets that
    people choose against guessing. These secrets are 256 random bits from `secrets`: no
    dictionary or precomputed table covers that space, so one fast hash is as safe as a slow
    one, and it keeps the check cheap on every request.
    """
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


# No secret hashes to it: the decoy never authenticates.
_DECOY_SHA256 = secrets.token_hex(32)


def _decoy_key() -> dict:
    """A key as the store returns one, its JSON columns parsed as find_key parses a found row's."""
    return {"secret_sha256": _DECOY_SHA256, "roles": json.loads('["read"]'), "clinics": json.loads('["C001"]'),
            "revoked_at": None}


def new_key() -> tuple[str, str]:
    """A fresh (key_id, token); the token is `rs_<key_id>_<secret>`."""
    key_id = secrets.token_hex(KEY_ID_BYTES)
    return key_id, f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"


def parse_token(token: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed token, else None."""
    match = _TOKEN_RE.fullmatch(token)
    return (match.group(1), match.group(2)) if match else None


def create_key(store, *, name: str, roles: list[str], clinics: list[str] | None, now: str) -> tuple[str, str]:
    """Store a new key (only the hash of its secret) and return (key_id, token).

    ValueError for a key that cannot be: no role, an unknown role, or an admin key limited to
    some clinics (admin is every clinic)."""
    if not roles or not set(roles) <= set(ROLES):
        raise ValueError(f"a key needs one or more roles of {', '.join(ROLES)}")
    if "admin" in roles and clinics is not None:
        raise ValueError("an admin key works for every clinic: use --all-clinics, not --clinic")
    key_id, token = new_key()
    _, secret = parse_token(token)
    store.create_key(key_id=key_id, name=name, roles=roles, clinics=clinics,
                     secret_sha256=hash_secret(secret), created_at=now)
    return key_id, token


def authenticate(store, token: str) -> Principal:
    """The principal a token stands for; KeyRejected(reason, key_id) when it stands for none."""
    parsed = parse_token(token)
    if parsed is None:
        raise KeyRejected("malformed-key")
    key_id, secret = parsed
    key = store.find_key(key_id)
    # An unknown key id is checked against a decoy, so that it costs what a wrong secret for a
    # known id costs: the answer, and its Server-Timing, must not tell which key ids exist.
    checked = key if key is not None else _decoy_key()
    secret_matches = hmac.compare_digest(hash_secret(secret), checked["secret_sha256"])
    if key is None:
        raise KeyRejected("unknown-key", key_id)
    if not secret_matches:
        raise KeyRejected("wrong-secret", key_id)
    if key["revoked_at"] is not None:
        raise KeyRejected("revoked-key", key_id)
    clinics = key["clinics"]
    return Principal(key_id=key_id, roles=frozenset(key["roles"]),
                     clinics=None if clinics is None else frozenset(clinics))
