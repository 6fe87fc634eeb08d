"""API keys: what is stored of them, how a presented key is judged, migration 4, and the
`keys` command line (run as a real process, as an operator runs it)."""

from __future__ import annotations

import hashlib
import sqlite3
import statistics
import subprocess
import time

import pytest

from records_service import keys
from records_service.store.sqlite import migrations
from records_service.access import Principal
from records_service.store import open_store
from records_service.store.sqlite import SQLiteStore as Store
from tests.live import RawDatabase, run_cli

NOW = "2025-06-01T12:00:00.000Z"


@pytest.fixture
def store(settings):
    s = open_store(settings)
    s.open()
    yield s
    s.close()


def test_a_token_names_its_key_and_carries_256_random_bits():
    key_id, token = keys.new_key()
    assert keys.parse_token(token)[0] == key_id and len(key_id) == 16
    assert len(keys.parse_token(token)[1]) == 43  # 32 bytes, url-safe base64
    assert keys.new_key()[1] != token


@pytest.mark.parametrize("token", [
    "", "rs_", "rs_0123456789abcdef_", "rs_0123456789ABCDEF_" + "a" * 43, "rs_0123456789abcdef_" + "a" * 42,
    "rs_0123456789abcdef_" + "a" * 44, "xx_0123456789abcdef_" + "a" * 43, "rs_0123456789abcdef_" + "a" * 42 + "=",
    " rs_0123456789abcdef_" + "a" * 43, "rs_0123456789abcdef_" + "a" * 42 + "\u00e9",
])
def test_a_malformed_token_is_not_parsed(token):
    assert keys.parse_token(token) is None


@pytest.mark.both_engines
def test_only_a_hash_of_the_secret_is_stored(store, settings):
    key_id, token = keys.create_key(store, name="lab A", roles=["ingest"], clinics=["C001"], now=NOW)
    secret = keys.parse_token(token)[1]
    rows = RawDatabase(settings.db_path, settings.database_url).execute("SELECT * FROM api_keys")
    assert len(rows) == 1
    assert not any(secret in str(column) for column in rows[0])
    assert hashlib.sha256(secret.encode()).hexdigest() in rows[0]


@pytest.mark.both_engines
def test_a_key_authenticates_as_its_roles_and_clinics(store):
    _, scoped = keys.create_key(store, name="lab", roles=["ingest", "read"], clinics=["C001", "C002"], now=NOW)
    key_id, admin = keys.create_key(store, name="ops", roles=["admin"], clinics=None, now=NOW)
    principal = keys.authenticate(store, scoped)
    assert (principal.roles, principal.clinics) == ({"ingest", "read"}, {"C001", "C002"})
    assert keys.authenticate(store, admin) == Principal(key_id, frozenset({"admin"}), None)


@pytest.mark.both_engines
def test_unknown_wrong_secret_and_revoked_keys_are_rejected_with_their_reason(store):
    key_id, token = keys.create_key(store, name="lab", roles=["read"], clinics=["C001"], now=NOW)
    rejections = {}
    for name, presented in {"malformed": "rs_nope", "unknown": "rs_0123456789abcdef_" + "a" * 43,
                            "wrong secret": f"rs_{key_id}_" + "a" * 43}.items():
        with pytest.raises(keys.KeyRejected) as rejected:
            keys.authenticate(store, presented)
        rejections[name] = (rejected.value.reason, rejected.value.key_id)
    assert rejections == {"malformed": ("malformed-key", None), "unknown": ("unknown-key", "0123456789abcdef"),
                          "wrong secret": ("wrong-secret", key_id)}
    assert store.revoke_key(key_id, NOW)[1] is True
    with pytest.raises(keys.KeyRejected, match="revoked-key"):
        keys.authenticate(store, token)


def test_an_unknown_key_id_costs_what_a_wrong_secret_for_a_known_one_costs(store):
    """Statistical, not a seam counting hash calls: most of the gap was the store's work for a
    found key (its row, its JSON columns), which a count of hashes would not see. Interleaved
    pairs over thousands of tries, medians compared with a wide margin: before the decoy an
    unknown id cost 0.64-0.68 of a wrong secret, after it 0.91 (the rest is SQLite reading a
    row it found)."""
    for n in range(20):
        keys.create_key(store, name=f"k{n}", roles=["read"], clinics=["C001", "C002"], now=NOW)
    key_id, _ = keys.create_key(store, name="lab", roles=["read"], clinics=["C001"], now=NOW)
    unknown, wrong = "rs_0123456789abcdef_" + "a" * 43, f"rs_{key_id}_" + "a" * 43

    def cost_ns(token: str) -> int:
        started = time.perf_counter_ns()
        try:
            keys.authenticate(store, token)
        except keys.KeyRejected:
            return time.perf_counter_ns() - started
        raise AssertionError("the key was accepted")

    pairs = [(cost_ns(unknown), cost_ns(wrong)) for _ in range(4000)]
    ratio = statistics.median(u for u, _ in pairs) / statistics.median(w for _, w in pairs)
    assert 0.8 < ratio < 1.25, f"an unknown key id costs {ratio:.2f} of a wrong secret"


@pytest.mark.both_engines
def test_revoking_twice_keeps_the_first_time_and_an_unknown_key_is_none(store):
    key_id, _ = keys.create_key(store, name="lab", roles=["read"], clinics=["C001"], now=NOW)
    first, changed = store.revoke_key(key_id, NOW)
    again, changed_again = store.revoke_key(key_id, "2030-01-01T00:00:00.000Z")
    assert (changed, changed_again) == (True, False)
    assert first["revoked_at"] == again["revoked_at"] == NOW
    assert store.revoke_key("0123456789abcdef", NOW) is None


@pytest.mark.sqlite_only(reason="migration 4 of the SQLite schema")
def test_migration_4_adds_the_key_table_and_keeps_every_record(tmp_path):
    conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    migrations.migrate(conn, upto=3)
    conn.execute("INSERT INTO records (test_id, clinic_id, patient_id, test_type, status, collected_at, created_at,"
                 " updated_at, version, request_id, doc) VALUES ('T1', 'C1', 'P1', 'CBC', 'final', 'x', 'x', 'x', 1,"
                 " 'r', '{}')")
    assert conn.execute("PRAGMA user_version").fetchone()[0] < 4
    migrations.migrate(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.SCHEMA_VERSION >= 4
    assert conn.execute("SELECT test_id FROM records").fetchall() == [("T1",)]
    assert conn.execute("SELECT count(*) FROM api_keys").fetchone() == (0,)


# -- the command line, as a real process ------------------------------------------------------

def cli(tmp_path, *args: str, database_url: str | None = None) -> subprocess.CompletedProcess:
    return run_cli(tmp_path / "records.db", "keys", *args, database_url=database_url)


def test_create_prints_the_key_once_alone_on_the_last_line_and_logs_only_its_id(tmp_path):
    made = cli(tmp_path, "create", "--role", "ingest", "--role", "read", "--clinic", "C002", "--clinic", "C001",
               "--name", "lab A")
    assert made.returncode == 0, made.stderr
    token = made.stdout.splitlines()[-1]
    key_id, secret = keys.parse_token(token)
    assert f"created key {key_id} (lab A)" in made.stdout
    assert "roles:   ingest, read" in made.stdout and "clinics: C001, C002" in made.stdout
    assert secret not in made.stderr and key_id in made.stderr  # the log line names the key, nothing more
    store = Store(str(tmp_path / "records.db"))
    principal = keys.authenticate(store, token)
    assert (principal.roles, principal.clinics) == ({"ingest", "read"}, {"C001", "C002"})


@pytest.mark.both_engines
def test_list_shows_every_key_without_secrets_and_revoke_takes_it_out(tmp_path, settings):
    def run_keys(*args):
        return cli(tmp_path, *args, database_url=settings.database_url)

    scoped = run_keys("create", "--role", "read", "--clinic", "C001", "--name", "lab A").stdout.splitlines()[-1]
    admin = run_keys("create", "--role", "admin", "--all-clinics", "--name", "ops team").stdout.splitlines()[-1]
    scoped_id, admin_id = keys.parse_token(scoped)[0], keys.parse_token(admin)[0]

    listed = run_keys("list")
    assert listed.returncode == 0
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows[0] == ["KEY_ID", "STATUS", "ROLES", "CLINICS", "CREATED", "NAME"]
    assert [row[:4] + row[5:] for row in rows[1:]] == [
        [scoped_id, "active", "read", "C001", "lab", "A"], [admin_id, "active", "admin", "*", "ops", "team"]]
    assert keys.parse_token(scoped)[1] not in listed.stdout + listed.stderr

    revoked = run_keys("revoke", scoped_id)
    assert revoked.returncode == 0 and f"revoked key {scoped_id} (lab A)" in revoked.stdout
    again = run_keys("revoke", scoped_id)
    assert again.returncode == 0 and "already revoked" in again.stdout
    assert run_keys("list").stdout.splitlines()[1].split()[:2] == [scoped_id, "revoked"]
    with pytest.raises(keys.KeyRejected, match="revoked-key"):
        keys.authenticate(open_store(settings), scoped)


@pytest.mark.parametrize("args, message", [
    (["create", "--role", "read", "--name", "x"], "one of the arguments --clinic --all-clinics is required"),
    (["create", "--role", "read", "--clinic", "C1", "--all-clinics", "--name", "x"], "not allowed with"),
    (["create", "--role", "reader", "--clinic", "C1", "--name", "x"], "invalid choice: 'reader'"),
    (["create", "--role", "read", "--clinic", "bad id", "--name", "x"], "clinic id 'bad id' must match"),
    (["create", "--role", "read", "--clinic", "C1", "--name", " "], "a key name is 1 to 100 printable"),
    (["create", "--role", "read", "--clinic", "C1"], "the following arguments are required: --name"),
    (["create", "--role", "admin", "--clinic", "C1", "--name", "x"], "an admin key works for every clinic"),
    (["revoke"], "the following arguments are required: KEY_ID"),
])
def test_a_bad_create_or_revoke_is_exit_2_with_one_clear_message_and_makes_no_key(tmp_path, args, message):
    done = cli(tmp_path, *args)
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""
    assert not (tmp_path / "records.db").exists()


def test_revoking_an_unknown_key_is_exit_1_naming_it(tmp_path):
    done = cli(tmp_path, "revoke", "0123456789abcdef")
    assert done.returncode == 1 and "no key '0123456789abcdef'" in done.stderr
