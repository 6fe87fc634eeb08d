"""API keys in PostgreSQL: the same table and rules as SQLite's (only the secret's hash is stored;
find_key runs on every authenticated request, so a revocation holds from the next request)."""

from __future__ import annotations

import json

import psycopg

from ..base import KEY_LISTING, key_found, key_listing
from .connection import Database


def create_key(db: Database, *, key_id: str, name: str, roles: list[str], clinics: list[str] | None,
               secret_sha256: str, created_at: str) -> None:
    db.write(lambda conn: conn.execute(
        "INSERT INTO api_keys (key_id, name, roles, clinics, secret_sha256, created_at) VALUES (%s, %s, %s, %s, %s, %s)",
        (key_id, name, json.dumps(roles), None if clinics is None else json.dumps(clinics), secret_sha256,
         created_at)))


def find_key(db: Database, key_id: str) -> dict | None:
    rows = db.read("SELECT secret_sha256, roles, clinics, revoked_at FROM api_keys WHERE key_id = %s", (key_id,))
    return key_found(rows[0]) if rows else None


def list_keys(db: Database) -> list[dict]:
    """Every key, oldest first, without its hash."""
    return [key_listing(row) for row in db.read(
        f'SELECT {KEY_LISTING} FROM api_keys ORDER BY created_at COLLATE "C", key_id COLLATE "C"')]


def revoke_key(db: Database, key_id: str, now: str) -> tuple[dict, bool] | None:
    """Revoke a key: (its listing, whether this call revoked it), or None when there is no such key."""

    def work(conn: psycopg.Connection) -> tuple[dict, bool] | None:
        changed = conn.execute("UPDATE api_keys SET revoked_at = %s WHERE key_id = %s AND revoked_at IS NULL",
                               (now, key_id)).rowcount == 1
        row = conn.execute(f"SELECT {KEY_LISTING} FROM api_keys WHERE key_id = %s", (key_id,)).fetchone()
        return (key_listing(row), changed) if row else None

    return db.write(work)
