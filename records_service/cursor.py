"""Opaque, tamper-proof paging cursors: pure functions, no HTTP, no database.

A cursor is the last `seq` a page returned, signed with an HMAC over that seq and the query's
filters, under a key kept in the database (so every worker, and every restart, agrees on it).
It is opaque to clients (base64url of 8 bytes of seq and 16 of MAC). Editing it, or using it
with other filters than the page that issued it, makes the MAC fail: one answer for all, 400.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import struct

_SEQ = struct.Struct(">Q")
_MAC_BYTES = 16
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{32}", re.ASCII)


def _mac(secret: bytes, filters: dict[str, str], seq_bytes: bytes) -> bytes:
    signed = json.dumps(sorted(filters.items()), ensure_ascii=True).encode() + b"\0" + seq_bytes
    return hmac.new(secret, signed, hashlib.sha256).digest()[:_MAC_BYTES]


def encode(secret: bytes, filters: dict[str, str], last_seq: int) -> str:
    seq_bytes = _SEQ.pack(last_seq)
    return base64.urlsafe_b64encode(seq_bytes + _mac(secret, filters, seq_bytes)).decode("ascii")


def decode(secret: bytes, filters: dict[str, str], token: str) -> int | None:
    """The seq a cursor carries, or None when it is not one this service issued for these filters."""
    if not _TOKEN_RE.fullmatch(token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token)
    except (binascii.Error, ValueError):
        return None
    seq_bytes, mac = raw[:_SEQ.size], raw[_SEQ.size:]
    if not hmac.compare_digest(mac, _mac(secret, filters, seq_bytes)):
        return None
    return _SEQ.unpack(seq_bytes)[0]
