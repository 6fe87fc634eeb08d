"""Real gunicorn processes on loopback, and a minimal stdlib HTTP client to talk to them."""

from __future__ import annotations

import http.client
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
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


def run_cli(db_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m records_service ARGS` as an operator runs it, on the database at `db_path`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECORDS_")}
    env.update(RECORDS_DB_PATH=str(db_path), PYTHONPATH=str(REPO))
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


def request(port: int, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 30) -> Response:
    headers = dict(headers or {})
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
        headers.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


@dataclass
class Server:
    """One gunicorn master (in its own process group) started with the project's gunicorn.conf.py."""

    db_path: Path
    log_path: Path
    workers: int = 3
    env: dict = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    def start(self, deadline_s: float = 20) -> "Server":
        self.port = free_port()
        env = {**os.environ, "RECORDS_DB_PATH": str(self.db_path), "RECORDS_AUTH": "disabled", **self.env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [GUNICORN, "-c", str(REPO / "gunicorn.conf.py"), "-b", f"127.0.0.1:{self.port}", "-w", str(self.workers)],
            cwd=self.log_path.parent, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.wait_until_serving(deadline_s)
        return self

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
        """SIGKILL the whole process group: master and every worker, no chance to clean up."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


class Writers:
    """Client threads POSTing new records to a server until the block ends.

    `acknowledged` lists, in order, the test_ids answered 201. A thread stops at its first
    connection error (the server died under it: that record was never acknowledged).
    """

    def __init__(self, server: Server, make_record: Callable[[str], dict], prefix: str, threads: int = 8) -> None:
        self.acknowledged: list[str] = []
        self._server, self._make_record, self._prefix = server, make_record, prefix
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write, args=(n,)) for n in range(threads)]

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
        deadline = time.monotonic() + deadline_s
        while len(self.acknowledged) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.acknowledged)} writes acknowledged within {deadline_s}s")
            time.sleep(0.01)

    def __enter__(self) -> "Writers":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
