"""Configuration: read once, validated, a bad value stops start-up with one line naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from records_service.config import ConfigError, Settings, load_dotenv_file, load_settings, unknown_variables
from tests.live import GUNICORN, REPO


def test_defaults_match_the_documented_table():
    assert load_settings({}) == Settings(
        db_path="records.db", log_level="INFO", max_body_bytes=1_048_576, max_batch_bytes=16_777_216,
        auth="required", synchronous="NORMAL", busy_timeout_ms=5000, body_timeout_ms=10_000)


def test_every_variable_is_read():
    settings = load_settings({
        "RECORDS_DB_PATH": "/data/r.db", "RECORDS_LOG_LEVEL": "debug", "RECORDS_MAX_BODY_BYTES": "10",
        "RECORDS_MAX_BATCH_BYTES": "20", "RECORDS_AUTH": "disabled", "RECORDS_SYNCHRONOUS": "full",
        "RECORDS_BUSY_TIMEOUT_MS": "250", "RECORDS_BODY_TIMEOUT_MS": "750",
    })
    assert settings == Settings("/data/r.db", "DEBUG", 10, 20, "disabled", "FULL", 250, 750)


@pytest.mark.parametrize("name, value", [
    ("RECORDS_DB_PATH", "  "),
    ("RECORDS_LOG_LEVEL", "LOUD"),
    ("RECORDS_MAX_BODY_BYTES", "1MB"),
    ("RECORDS_MAX_BODY_BYTES", "0"),
    ("RECORDS_MAX_BATCH_BYTES", "-5"),
    ("RECORDS_AUTH", "off"),
    ("RECORDS_SYNCHRONOUS", "OFF"),
    ("RECORDS_BUSY_TIMEOUT_MS", "soon"),
    ("RECORDS_DATABASE_URL", "mysql://db/records"),
    ("RECORDS_DATABASE_URL", "/var/lib/records.db"),
    ("RECORDS_DATABASE_URL", "postgresql://"),
    ("RECORDS_DATABASE_URL", ""),
    ("RECORDS_BODY_TIMEOUT_MS", "0"),
])
def test_a_bad_value_is_an_error_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})


@pytest.mark.parametrize("url", ["postgresql://records@db.internal:5432/records", "postgres://u:pw@h/d",
                                 "postgresql:///records?host=/run/postgresql",
                                 "postgresql://a,b/records?target_session_attrs=read-write"])
def test_a_postgresql_url_selects_postgresql(url):
    assert load_settings({"RECORDS_DATABASE_URL": url}).database_url == url


def test_a_password_never_reaches_an_error_or_a_message():
    with pytest.raises(ConfigError) as refused:
        load_settings({"RECORDS_DATABASE_URL": "mysql://admin:s3cret@db/records"})
    assert "s3cret" not in str(refused.value) and "RECORDS_DATABASE_URL" in str(refused.value)
    named = load_settings({"RECORDS_DATABASE_URL": "postgresql://admin:s3cret@db/records"}).database_name()
    assert named == "postgresql://admin:***@db/records"


@pytest.mark.parametrize("name, value, unit", [
    ("RECORDS_MAX_BODY_BYTES", "1MB", "bytes"), ("RECORDS_MAX_BATCH_BYTES", "16 MiB", "bytes"),
    ("RECORDS_BUSY_TIMEOUT_MS", "5s", "milliseconds"), ("RECORDS_MAX_BODY_BYTES", "0", "bytes"),
    ("RECORDS_BUSY_TIMEOUT_MS", "-1", "milliseconds"),
])
def test_a_bad_number_names_the_unit_of_its_setting(name, value, unit):
    with pytest.raises(ConfigError) as error:
        load_settings({name: value})
    other = {"bytes": "milliseconds", "milliseconds": "bytes"}[unit]
    assert unit in str(error.value) and other not in str(error.value), str(error.value)


def test_dotenv_fills_gaps_and_the_real_environment_wins(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("RECORDS_MAX_BODY_BYTES=123\nRECORDS_LOG_LEVEL=DEBUG\n")
    monkeypatch.delenv("RECORDS_MAX_BODY_BYTES", raising=False)
    monkeypatch.setenv("RECORDS_LOG_LEVEL", "WARNING")
    try:
        load_dotenv_file(tmp_path)
        settings = load_settings(os.environ)
    finally:
        os.environ.pop("RECORDS_MAX_BODY_BYTES", None)
    assert settings.max_body_bytes == 123
    assert settings.log_level == "WARNING"


@pytest.mark.parametrize("source", ["environment", "dotenv"])
def test_gunicorn_refuses_to_start_with_one_line_naming_the_variable(tmp_path, source):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECORDS_")}
    if source == "environment":
        env["RECORDS_MAX_BODY_BYTES"] = "lots"
    else:
        (tmp_path / ".env").write_text("RECORDS_MAX_BODY_BYTES=lots\n")
    proc = subprocess.run([GUNICORN, "-c", str(REPO / "gunicorn.conf.py"), "-b", "127.0.0.1:0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "RECORDS_MAX_BODY_BYTES" in lines[0] and "lots" in lines[0]



def test_a_misspelled_setting_is_warned_about_naming_the_closest_one():
    warnings = unknown_variables({"RECORDS_MAX_BODY_BYTE": "10", "RECORDS_DB_PATH": "x", "records_auth_mode": "off",
                                  "RECORDS_COLOUR": "blue", "HOME": "/root"})
    assert warnings == [
        "RECORDS_COLOUR is not a records_service setting and is ignored: the settings are RECORDS_DB_PATH, "
        "RECORDS_LOG_LEVEL, RECORDS_MAX_BODY_BYTES, RECORDS_MAX_BATCH_BYTES, RECORDS_AUTH, RECORDS_SYNCHRONOUS, "
        "RECORDS_BUSY_TIMEOUT_MS, RECORDS_BODY_TIMEOUT_MS, RECORDS_DATABASE_URL",
        "RECORDS_MAX_BODY_BYTE is not a records_service setting and is ignored: did you mean RECORDS_MAX_BODY_BYTES?",
        "records_auth_mode is not a records_service setting and is ignored: did you mean RECORDS_AUTH?",
    ]
    assert unknown_variables({"RECORDS_DB_PATH": "x", "PATH": "/bin"}) == []


def test_gunicorn_and_the_command_line_warn_once_about_a_misspelled_setting(start_server, tmp_path):
    server = start_server(workers=2, RECORDS_MAX_BATCH_BYTE="10")
    warned = [line for line in server.log_lines() if line["message"].startswith("RECORDS_MAX_BATCH_BYTE ")]
    assert len(warned) == 1 and warned[0]["level"] == "WARNING", warned
    assert warned[0]["message"].endswith("did you mean RECORDS_MAX_BATCH_BYTES?")

    env = {k: v for k, v in os.environ.items() if not k.startswith("RECORDS_")}
    env.update(RECORDS_DB_PATH=str(tmp_path / "cli.db"), RECORDS_BUSY_TIMEOUT="5000", PYTHONPATH=str(REPO))
    cli = subprocess.run([sys.executable, "-m", "records_service", "keys", "list"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    warned = [json.loads(line) for line in cli.stderr.splitlines() if "RECORDS_BUSY_TIMEOUT " in line]
    assert len(warned) == 1 and warned[0]["message"].endswith("did you mean RECORDS_BUSY_TIMEOUT_MS?")


def test_a_database_path_in_a_missing_directory_is_logged_naming_that_directory(start_server, tmp_path):
    missing = tmp_path / "no-such-dir"
    server = start_server(workers=1, db_path=missing / "records.db")
    logged = [line["message"] for line in server.log_lines() if line["level"] == "ERROR"]
    assert logged and all(f"directory {missing} does not exist" in message for message in logged), logged
    assert server.request("GET", "/ready").status == 503

    env = {k: v for k, v in os.environ.items() if not k.startswith("RECORDS_")}
    env.update(RECORDS_DB_PATH=str(missing / "records.db"), PYTHONPATH=str(REPO))
    cli = subprocess.run([sys.executable, "-m", "records_service", "keys", "list"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode != 0 and f"directory {missing} does not exist" in cli.stderr, cli.stderr
