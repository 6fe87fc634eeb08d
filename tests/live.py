"""Real gunicorn processes on loopback, and a minimal stdlib HTTP client to talk to them."""

from __future__ import annotations

import glob
import http.client
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


def debian_command(command: str, package: str) -> str:
    """The path of `command`, installing Debian's `package` with apt-get when it is missing.

    Skips (saying why) only where it cannot be installed: no apt-get, or not root.
    """
    found = shutil.which(command)
    if found:
        return found
    if not shutil.which("apt-get"):
        pytest.skip(f"{command} is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip(f"{command} is not installed and installing it needs root (apt-get install -y {package})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    out = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:  # the package lists may be stale or absent: refresh once
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=300)
        out = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0 or not shutil.which(command):
        pytest.skip(f"{command} could not be installed: {(out.stderr or out.stdout).strip()[-300:]}")
    return shutil.which(command)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(db_path: Path, *args: str, timeout: float = 60, database_url: str | None = None
            ) -> subprocess.CompletedProcess:
    """`python -m records_service ARGS` as an operator runs it, on the database at `db_path`
    (or the PostgreSQL one at `database_url`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECORDS_")}
    env.update(RECORDS_DB_PATH=str(db_path), PYTHONPATH=str(REPO))
    if database_url:
        env["RECORDS_DATABASE_URL"] = database_url
    return subprocess.run([sys.executable, "-m", "records_service", *args], cwd=Path(db_path).parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


def on_a_terminal(run: Callable[[int], subprocess.CompletedProcess]) -> tuple[subprocess.CompletedProcess, bytes]:
    """Call `run` with the descriptor of a pseudo-terminal to write to (a command's standard error):
    what it returned, and everything the terminal was shown."""
    master, slave = pty.openpty()
    try:
        done = run(slave)
        os.close(slave)
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the pty is drained once its other side is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    return done, shown


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


class AnswerCutOff(http.client.IncompleteRead):
    """An answer whose status line and headers came but whose body was cut off: the server (or
    the host behind nginx) died between sending the one and the other."""

    def __init__(self, status: int, cut: http.client.IncompleteRead) -> None:
        super().__init__(cut.partial, cut.expected)
        self.status = status


def request(port: int, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 30) -> Response:
    headers = dict(headers or {})
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
        headers.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        try:
            content = resp.read()
        except http.client.IncompleteRead as cut:
            raise AnswerCutOff(resp.status, cut) from cut
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, content)
    finally:
        conn.close()


@dataclass
class Server:
    """One gunicorn master (in its own process group) started with the project's gunicorn.conf.py."""

    db_path: Path
    log_path: Path
    workers: int = 3
    env: dict = field(default_factory=dict)
    database_url: str | None = None  # PostgreSQL's, instead of the SQLite file at db_path
    port: int = 0
    proc: subprocess.Popen | None = None

    def start(self, deadline_s: float = 20) -> "Server":
        self.port = free_port()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self._command(), cwd=self.log_path.parent, env=self._env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_until_serving(deadline_s)
        return self

    def _command(self) -> list[str]:
        return [GUNICORN, "-c", str(REPO / "gunicorn.conf.py"), "-b", f"127.0.0.1:{self.port}", "-w", str(self.workers)]

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "RECORDS_DATABASE_URL"}
        env.update({"RECORDS_DB_PATH": str(self.db_path), "RECORDS_AUTH": "disabled", **self.env})
        if self.database_url:
            env["RECORDS_DATABASE_URL"] = self.database_url
        return env

    def setting(self, name: str) -> str:
        """The value gunicorn uses for one of its settings with this server's config and options."""
        out = subprocess.run([*self._command(), "--print-config"], cwd=self.log_path.parent, env=self._env(),
                             capture_output=True, text=True, timeout=60, check=True).stdout
        match = re.search(rf"^{name}\s*=\s*(.*)$", out, re.MULTILINE)
        assert match, f"gunicorn --print-config shows no {name}"
        return match.group(1).strip()

    def request_slots(self) -> int:
        """How many requests this server reads at once: workers x threads per worker."""
        return int(self.setting("workers")) * int(self.setting("threads"))

    def wait_until_serving(self, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if request(self.port, "GET", "/health", timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"gunicorn did not answer /health on port {self.port} within {deadline_s}s:\n{self.output()}")

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 30) -> Response:
        return request(self.port, method, path, body, headers, timeout)

    def walk(self, path: str) -> list[dict]:
        """Every record of a GET /tests query, page after page along the `Link: rel="next"` headers."""
        records = []
        while path:
            resp = self.request("GET", path)
            assert resp.status == 200, resp.body
            records += resp.json()
            match = re.fullmatch(r'<([^>]*)>; rel="next"', resp.headers.get("link", ""))
            path = match.group(1) if match else None
        return records

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict]:
        """Every line gunicorn and the app wrote, parsed; a line that is not JSON fails the test."""
        return [json.loads(line) for line in self.output().splitlines() if line.strip()]

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def terminate(self, timeout: float = 30) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group: master and every worker, no chance to clean up.

        Returns once the port refuses connections: a worker that outlives the master for a moment
        still holds the listening socket, and a client (nginx) would connect to a dying server.
        """
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                except OSError:
                    break
                time.sleep(0.01)
        self._log.close()


def damage_pages_holding(db_path: Path, marker: bytes) -> int:
    """Overwrite every page of a closed SQLite file that holds `marker` with 0xFF bytes, as a
    failing disk would: reading those pages is then a real SQLITE_CORRUPT ("database disk image
    is malformed"), and every other page reads as before. Returns how many pages were hit."""
    conn = sqlite3.connect(db_path)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    data = bytearray(Path(db_path).read_bytes())
    pages = set()
    at = data.find(marker)
    while at >= 0:
        pages.add(at // page_size)
        at = data.find(marker, at + 1)
    for page in pages:
        data[page * page_size:(page + 1) * page_size] = b"\xff" * page_size
    Path(db_path).write_bytes(bytes(data))
    return len(pages)


def anon_kib(pid: int) -> int:
    """A process's anonymous memory now (Pss_Anon, else Anonymous, of /proc/PID/smaps_rollup), in KiB:
    what its heap costs, unlike VmHWM, which a peak long past keeps high."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0])
    return fields.get("Pss_Anon", fields.get("Anonymous", 0))


class AnonPeak:
    """The peak anonymous memory of a process during a block, sampled every few milliseconds:
    `base` before, `peak` the largest seen (a process that dies stops the sampling)."""

    def __init__(self, pid: int, every_s: float = 0.005) -> None:
        self.pid, self._every_s = pid, every_s
        self.base = self.peak = anon_kib(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._done.is_set():
            try:
                self.peak = max(self.peak, anon_kib(self.pid))
            except OSError:
                return
            time.sleep(self._every_s)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 1024

    def __enter__(self) -> "AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


class WriterThreads:
    """Client threads, each running `_write(client_no)` until the block ends."""

    def __init__(self, threads: int) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write, args=(n,)) for n in range(threads)]

    def _write(self, client_no: int) -> None:
        raise NotImplementedError

    @staticmethod
    def _wait_until(acknowledged: Callable[[], int], count: int, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while (got := acknowledged()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {got} of {count} writes acknowledged within {deadline_s}s")
            time.sleep(0.01)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


class Writers(WriterThreads):
    """Client threads POSTing new records to a server until the block ends.

    `acknowledged` lists, in order, the test_ids answered 201. A thread stops at its first
    connection error (the server died under it: that record was never acknowledged).
    """

    def __init__(self, server: Server, make_record: Callable[[str], dict], prefix: str, threads: int = 8) -> None:
        super().__init__(threads)
        self.acknowledged: list[str] = []
        self._server, self._make_record, self._prefix = server, make_record, prefix

    def _write(self, client_no: int) -> None:
        i = 0
        while not self._stop.is_set():
            test_id = f"{self._prefix}{client_no}-{i}"
            try:
                resp = self._server.request("POST", "/tests", self._make_record(test_id), timeout=5)
            except (OSError, http.client.HTTPException):
                return
            if resp.status == 201:
                self.acknowledged.append(test_id)
            i += 1

    def wait_for(self, count: int, deadline_s: float = 30) -> None:
        self._wait_until(lambda: len(self.acknowledged), count, deadline_s)


@dataclass
class Answer:
    """One answer to one POST: its status (None: the connection failed), Retry-After, whether a
    409 said `identical: true`, and when (time.monotonic()) it was asked and answered; for an
    answer whose body was cut off (status None), the status its head had."""

    status: int | None
    retry_after: str | None
    identical: bool | None
    started: float
    ended: float
    cut_off_status: int | None = None


class RetryingWriters(WriterThreads):
    """Client threads POSTing new records to `port` until the block ends, as a careful client
    does: the same record again while the answer is 502, 503 or a failed connection (pausing
    `pause_s`), until another answer comes or `give_up_s` has passed since the first try.

    `answers[test_id]` lists every answer one record got, in order.
    """

    RETRIED = (502, 503, None)

    def __init__(self, port: int, make_record: Callable[[str], dict], prefix: str, threads: int = 8,
                 pause_s: float = 0.1, give_up_s: float = 60, timeout_s: float = 30) -> None:
        super().__init__(threads)
        self.answers: dict[str, list[Answer]] = {}
        self._port, self._make_record, self._prefix = port, make_record, prefix
        self._pause_s, self._give_up_s, self._timeout_s = pause_s, give_up_s, timeout_s

    def _post(self, test_id: str) -> Answer:
        started = time.monotonic()
        try:
            resp = request(self._port, "POST", "/tests", self._make_record(test_id), timeout=self._timeout_s)
        except AnswerCutOff as cut:
            return Answer(None, None, None, started, time.monotonic(), cut_off_status=cut.status)
        except (OSError, http.client.HTTPException):
            return Answer(None, None, None, started, time.monotonic())
        identical = resp.json().get("identical") if resp.status == 409 else None
        return Answer(resp.status, resp.headers.get("retry-after"), identical, started, time.monotonic())

    def _write(self, client_no: int) -> None:
        i = 0
        while not self._stop.is_set():
            test_id = f"{self._prefix}{client_no}-{i}"
            answers = self.answers[test_id] = [self._post(test_id)]
            give_up = answers[0].started + self._give_up_s
            while answers[-1].status in self.RETRIED and time.monotonic() < give_up:
                time.sleep(self._pause_s)
                answers.append(self._post(test_id))
            i += 1

    def acknowledged(self) -> list[str]:
        """The test_ids the service said it holds: answered 201, or 409 with identical true."""
        return [test_id for test_id, answers in list(self.answers.items())
                if answers[-1].status == 201 or (answers[-1].status == 409 and answers[-1].identical)]

    def all_answers(self) -> list[Answer]:
        return [answer for answers in list(self.answers.values()) for answer in answers]

    def wait_for(self, count: int, since: float = 0, deadline_s: float = 30) -> None:
        """Until `count` answers were 201 that were asked at or after `since` (time.monotonic())."""
        self._wait_until(lambda: sum(1 for a in self.all_answers() if a.status == 201 and a.started >= since), count,
                         deadline_s)


def postgres_command(command: str) -> str:
    """The path of PostgreSQL's `command` (initdb, pg_ctl ...): on PATH, or where Debian puts the
    server's binaries, installing Debian's `postgresql` when there is none."""
    found = shutil.which(command) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{command}"),
                                                      reverse=True)), None)
    if found:
        return found
    debian_command("pg_ctlcluster", "postgresql")
    return sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{command}"), reverse=True)[0]


class PostgresCluster:
    """A throwaway PostgreSQL cluster in a temporary directory, on a free loopback port.

    initdb and pg_ctl refuse to run as root, so as root they run as the `postgres` user (the
    owner of the data directory). fsync stays on: the cluster is as durable as a real one.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="records-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.log_path = self.dir / "postgres.log"
        self._databases = 0

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        command = [str(arg) for arg in args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        if out.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed:\n{out.stdout}{out.stderr}")
        return out

    def start(self) -> "PostgresCluster":
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._run(postgres_command("initdb"), "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C.UTF-8", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.dir}'\n"
                       "max_connections = 400\nshared_buffers = 32MB\nfsync = on\n")
        self.start_server()
        admin(self.url(), "CREATE DATABASE records_tests")
        return self

    def start_server(self) -> "PostgresCluster":
        self._run(postgres_command("pg_ctl"), "-D", self.data, "-l", self.log_path, "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(postgres_command("pg_ctl"), "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database of this cluster: a schema of its own in one shared
        database, named by the URL's search_path (CREATE DATABASE took ~0.4 s, a schema ~1 ms)."""
        self._databases += 1
        name = f"t_{os.getpid()}_{self._databases}"
        admin(self.url("records_tests"), f"CREATE SCHEMA {name}")
        return self.url("records_tests") + f"?options=-csearch_path%3D{name}"

    def add_standby(self, deadline_s: float = 30) -> "PostgresCluster":
        """A synchronous streaming standby of this cluster, on a port of its own: a base backup
        (`pg_basebackup -R` writes primary_conninfo and standby.signal), started, then made this
        cluster's `synchronous_standby_names = '*'`, so a COMMIT returns only once the standby
        has flushed it. Returns when the primary reports the standby `sync`."""
        standby = PostgresCluster()
        if os.geteuid() == 0:
            shutil.chown(standby.dir, "postgres")
        standby._run(postgres_command("pg_basebackup"), "-h", "127.0.0.1", "-p", self.port, "-U", "postgres",
                     "-D", standby.data, "-R", "-X", "stream", "--checkpoint=fast", "--no-sync")
        with open(standby.data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {standby.port}\nunix_socket_directories = '{standby.dir}'\n")
        standby.start_server()
        admin(self.url(), "ALTER SYSTEM SET synchronous_standby_names = '*'", "SELECT pg_reload_conf()")
        deadline = time.monotonic() + deadline_s
        while admin(self.url(), "SELECT sync_state FROM pg_stat_replication") != [("sync",)]:
            assert time.monotonic() < deadline, f"the standby is not synchronous within {deadline_s}s"
            time.sleep(0.05)
        return standby

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def promote(self) -> None:
        """Make this standby a primary; returns once it accepts writes."""
        self._run(postgres_command("pg_ctl"), "-D", self.data, "-w", "-t", "60", "promote")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except (AssertionError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class RawDatabase:
    """Plain SQL on a test's database, outside the store (as a script might write), on either
    engine: `?` placeholders, rows back, and `refused` the error the database's own rules raise."""

    def __init__(self, db_path: str, database_url: str | None) -> None:
        if database_url:
            import psycopg

            self.conn = psycopg.connect(database_url, autocommit=True)
            self.refused = psycopg.errors.IntegrityConstraintViolation
            self._placeholder = "%s"
        else:
            self.conn = sqlite3.connect(db_path, isolation_level=None)
            self.refused = sqlite3.IntegrityError
            self._placeholder = "?"

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        cursor = self.conn.execute(sql.replace("?", self._placeholder), params)
        return cursor.fetchall() if cursor.description else []

    def close(self) -> None:
        self.conn.close()


@contextmanager
def writes_held(server: "Server"):
    """Hold the database's write lock from outside the service, as a long script would, while
    reads go on: SQLite's BEGIN IMMEDIATE, PostgreSQL's EXCLUSIVE lock on records."""
    db = RawDatabase(str(server.db_path), server.database_url)
    db.execute("BEGIN IMMEDIATE" if server.database_url is None else "BEGIN")
    if server.database_url:
        db.execute("LOCK TABLE records IN EXCLUSIVE MODE")
    try:
        yield db
    finally:
        db.execute("ROLLBACK")
        db.close()


class ExistingPostgres:
    """A PostgreSQL server someone else runs (RECORDS_TEST_DATABASE_URL): tests get schemas in its database."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._databases = 0

    def url(self) -> str:
        return self._url

    def new_database(self) -> str:
        self._databases += 1
        name = f"t_{os.getpid()}_{self._databases}_{os.urandom(3).hex()}"
        admin(self._url, f"CREATE SCHEMA {name}")
        separator = "&" if "?" in self._url else "?"
        return f"{self._url}{separator}options=-csearch_path%3D{name}"


def admin(url: str, *statements: str) -> list:
    """Run statements on `url` in autocommit (CREATE DATABASE, pg_terminate_backend ...); the last one's rows."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = []
        for statement in statements:
            cursor = conn.execute(statement)
            rows = cursor.fetchall() if cursor.description else []
        return rows


NGINX_CONF = REPO / "deploy" / "nginx.conf"


def render_nginx_conf(directory: Path, port: int, upstreams: list[str], **overrides: str) -> Path:
    """deploy/nginx.conf as a test runs it, written into `directory`.

    Only what a test must change is changed, each line replaced exactly (so an edit of one of
    these lines in the shipped file fails here instead of going untested): the listen port, the
    upstream `server` lines (`host:port` each), the user (the one running the tests) and the
    paths (inside `directory`). `overrides` replaces the value of other directives, for tests
    that provoke a timeout or a limit quickly (e.g. proxy_read_timeout="1s").
    """
    import grp
    import pwd

    text = NGINX_CONF.read_text()
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    replacements = {
        "user www-data;": f"user {user} {group};",
        "pid /run/nginx.pid;": f"pid {directory}/nginx.pid;",
        "error_log /var/log/nginx/error.log warn;": f"error_log {directory}/error.log info;",
        "access_log /var/log/nginx/access.log records_service;": f"access_log {directory}/access.log records_service;",
        "client_body_temp_path /var/lib/nginx/body;": f"client_body_temp_path {directory}/body;",
        "proxy_temp_path /var/lib/nginx/proxy;": f"proxy_temp_path {directory}/proxy;",
        "listen 80 default_server;": f"listen 127.0.0.1:{port} default_server;",
        "server 127.0.0.1:8000 max_fails=1 fail_timeout=5s;":
            " ".join(f"server {u} max_fails=1 fail_timeout=5s;" for u in upstreams),
    }
    for directive, value in overrides.items():
        found = re.findall(rf"^\s*{directive} [^;]*;", text, re.MULTILINE)
        assert len(found) == 1, f"{directive} appears {len(found)} times in {NGINX_CONF}"
        replacements[found[0].strip()] = f"{directive} {value};"
    for line, replacement in replacements.items():
        assert text.count(line) == 1, f"{NGINX_CONF} no longer has exactly one {line!r}"
        text = text.replace(line, replacement)
    rendered = directory / "nginx.conf"
    rendered.write_text(text)
    return rendered


@dataclass
class Nginx:
    """Debian's nginx running deploy/nginx.conf in the foreground, in front of `upstreams`."""

    directory: Path
    upstreams: list[str]
    overrides: dict = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    def start(self, deadline_s: float = 10) -> "Nginx":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = render_nginx_conf(self.directory, self.port, self.upstreams, **self.overrides)
        self.proc = subprocess.Popen([debian_command("nginx", "nginx-light"), "-c", str(conf), "-p", str(self.directory), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited with {self.proc.returncode}:\n{self.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"nginx did not listen on port {self.port} within {deadline_s}s:\n{self.error_log()}")

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 30) -> Response:
        return request(self.port, method, path, body, headers, timeout)

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self, waiting_for: int = 0, deadline_s: float = 5) -> list[dict]:
        """nginx's access log, one JSON object a line; a line that is not JSON fails the test.

        nginx writes a request's line after its response has gone out, so a client can read the
        answer before the line exists: wait (up to the deadline) for at least `waiting_for` lines."""
        path = self.directory / "access.log"
        deadline = time.monotonic() + deadline_s
        while True:
            lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
            if len(lines) >= waiting_for or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGKILL the master and its workers (their own process group)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class SlowClients:
    """`count` raw connections to `port` that each send `head` at once, then one byte of `body`
    every `interval` seconds (a client on a very slow link, or a deliberate attacker), for as
    long as the block lasts or until the server answers or closes.

    `answers` holds what each connection got back (b"" for a connection closed unanswered);
    a connection still sending when the block ends is left out of it.
    """

    def __init__(self, port: int, head: bytes, body: bytes, count: int, interval: float = 1.0) -> None:
        self.answers: list[bytes] = []
        self._port, self._head, self._body, self._interval = port, head, body, interval
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._dribble) for _ in range(count)]
        self._lock = threading.Lock()
        self.started = threading.Barrier(count + 1)

    def _dribble(self) -> None:
        with socket.create_connection(("127.0.0.1", self._port), timeout=5) as sock:
            sock.sendall(self._head)
            self.started.wait()
            for byte in self._body:
                readable, _, _ = select.select([sock], [], [], self._interval)
                if readable or self._stop.is_set():
                    break
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
            if self._stop.is_set():
                return
            answer = read_until_closed(sock, tolerate=(OSError,))
            with self._lock:
                self.answers.append(answer)

    def __enter__(self) -> "SlowClients":
        for t in self._threads:
            t.start()
        self.started.wait()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def wait(self, deadline_s: float) -> None:
        """Until every connection was answered or closed."""
        end = time.monotonic() + deadline_s
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), f"slow clients still sending after {deadline_s}s"


def send_raw(port: int, data: bytes, timeout: float) -> tuple[bytes, float]:
    """Send `data` on a fresh connection, then read until the server closes it or `timeout`:
    (what came back, seconds until the server closed the connection or the read failed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        started = time.monotonic()
        answer = read_until_closed(sock)
        return answer, time.monotonic() - started


def read_until_closed(sock: socket.socket, tolerate: tuple[type[OSError], ...] = (ConnectionResetError,)) -> bytes:
    """Everything the peer sends until it closes the connection (or one of `tolerate` is raised)."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except tolerate:
        pass
    return answer


def parse_raw_response(raw: bytes) -> Response:
    """A response as read off the wire by send_raw (Content-Length framed)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return Response(int(status_line.split()[1]), headers, body)
