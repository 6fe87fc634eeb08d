"""The README's walkthrough runs as written, and its two commands are the ones CI runs.

The walkthrough is the README's shell blocks marked `<!-- walkthrough -->` (typed in a second
terminal, one shell session) and `<!-- walkthrough: terminal 1 -->` (the server's terminal). They
run in document order in a fresh copy of the repository, against real gunicorn started by the
README's own command, with this test suite's virtual environment as `.venv` (the setup part of
the README's first command is what `.ci/run` does before the suite runs). Lines starting `#>`
are what the command above them prints: each must appear, in order, in its output, `…`
standing for anything within one line.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.live import REPO, debian_command, free_port, request

README = REPO / "README.md"
SETUP = "python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && "
SERVE = ".venv/bin/gunicorn -c gunicorn.conf.py"
PORT_LINE = re.compile(r"^PORT=8000\b")  # the test serves on a free port instead
COMMAND_TIMEOUT_S = 60
MAX_README_BYTES = 15_000
# A fresh clone holds none of these: build products, local state, a developer's own settings.
NOT_IN_A_CLONE = (".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".env", "*.db", "*.db-*",
                  "*.log", "backup.db")


@dataclass
class Command:
    text: str
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    terminal: int  # 1: the server's terminal; 2: the second terminal
    lines: list[str]


def walkthrough_blocks(markdown: str) -> list[Block]:
    blocks = re.findall(r"^<!-- walkthrough(: terminal 1)? -->\n```sh\n(.*?)^```$", markdown, re.MULTILINE | re.DOTALL)
    return [Block(1 if terminal else 2, body.splitlines()) for terminal, body in blocks]


def open_quote(text: str) -> str | None:
    """The quote character a shell command leaves open at its end, if any (comments skipped)."""
    quote, chars = None, iter(enumerate(text))
    for i, char in chars:
        if quote == "'":
            quote = None if char == "'" else quote
        elif char == "\\":
            next(chars, None)
        elif quote == '"':
            quote = None if char == '"' else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            for _, skipped in chars:
                if skipped == "\n":
                    break
    return quote


def commands_of(lines: list[str]) -> list[Command]:
    """Commands (a line, its `\\` continuations and quoted newlines) with the `#>` lines after each."""
    commands: list[Command] = []
    continued = False
    for line in lines:
        if continued:
            commands[-1].text += "\n" + line
        elif line.startswith("#>"):
            commands[-1].expected.append(line.removeprefix("#>").strip())
        elif line.strip() and not line.lstrip().startswith("#"):
            commands.append(Command(line))
        continued = bool(commands) and (line.endswith("\\") or open_quote(commands[-1].text) is not None)
    return commands


def expected_pattern(line: str) -> re.Pattern:
    return re.compile(".*?".join(re.escape(piece) for piece in line.split("…")))


def assert_prints(command: Command, output: str) -> None:
    position = 0
    for line in command.expected:
        match = expected_pattern(line).search(output, position)
        assert match, f"the README says\n  {command.text}\nprints\n  {line}\nbut it printed:\n{output}"
        position = match.end()


class Terminal:
    """One interactive `bash -euo pipefail` session, fed one command at a time."""

    def __init__(self, cwd: Path, env: dict) -> None:
        self._proc = subprocess.Popen(["bash", "-euo", "pipefail"], cwd=cwd, env=env, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._mark = f"--- {uuid.uuid4()} ---"

    def _read(self) -> None:
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def run(self, command: str) -> str:
        """What the command printed; fails the test when it fails (set -e ends the session)."""
        # Standard input stays the script's own: a command never reads the rest of the walkthrough.
        self._proc.stdin.write(f"{{\n{command}\n}} </dev/null\nprintf '\\n%s\\n' '{self._mark}'\n")
        self._proc.stdin.flush()
        printed = []
        while True:
            try:
                line = self._lines.get(timeout=COMMAND_TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(f"no end of\n  {command}\nwithin {COMMAND_TIMEOUT_S}s:\n{''.join(printed)}")
            if line is None:
                self._proc.wait(10)
                raise AssertionError(f"the README's command\n  {command}\nfailed (exit status "
                                     f"{self._proc.returncode}):\n{''.join(printed)}")
            if line.rstrip("\n") == self._mark:
                return "".join(printed)
            printed.append(line)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(10)


class ServerTerminal:
    """The first terminal: runs its blocks, keeps the gunicorn they start, Ctrl-C stops it."""

    def __init__(self, cwd: Path, env: dict, port: int) -> None:
        self._cwd, self._port = cwd, port
        # gunicorn reads GUNICORN_CMD_ARGS after gunicorn.conf.py: the README's command, on our port.
        self._env = {**env, "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port}"}
        self._server: subprocess.Popen | None = None
        self._output = cwd.parent / "terminal-1.out"

    def run(self, lines: list[str]) -> None:
        self.interrupt()
        serve = [line for line in lines if line.removeprefix(SETUP).startswith(SERVE)]
        assert len(serve) == 1 and lines[-1] == serve[0], f"a terminal-1 block ends in {SERVE}: {lines}"
        before = "\n".join(lines[:-1])
        if before.strip():
            subprocess.run(["bash", "-euo", "pipefail", "-c", before], cwd=self._cwd, env=self._env,
                           check=True, timeout=COMMAND_TIMEOUT_S)
        with open(self._output, "ab") as out:
            self._server = subprocess.Popen(["bash", "-c", lines[-1].removeprefix(SETUP)], cwd=self._cwd,
                                            env=self._env, stdout=out, stderr=out, start_new_session=True)
        self._wait_until_serving()

    def _wait_until_serving(self, deadline_s: float = 30) -> None:
        for _ in range(int(deadline_s / 0.1)):
            assert self._server.poll() is None, f"gunicorn exited:\n{self._output.read_text(errors='replace')}"
            try:
                if request(self._port, "GET", "/health", timeout=2).status == 200:
                    return
            except OSError:
                pass
            threading.Event().wait(0.1)
        raise AssertionError(f"gunicorn did not answer within {deadline_s}s")

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the terminal's foreground process group. The service must stop: its
        workers exit and its master says "Shutting down". Under heavy load gunicorn 27's master
        has been seen to linger after saying so (its workers gone, its socket closed, nothing
        served); such a master is killed here, as a second Ctrl-C would, and the test goes on."""
        if self._server and self._server.poll() is None:
            os.killpg(self._server.pid, signal.SIGINT)
            try:
                self._server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self._server.pid, signal.SIGKILL)
                self._server.wait(10)
                said = self._output.read_text(errors="replace").splitlines()[-3:]
                assert any('"Shutting down: Master"' in line for line in said), \
                    "Ctrl-C did not stop gunicorn within 30 s:\n" + "\n".join(said)
                with pytest.raises(OSError):
                    request(self._port, "GET", "/health", timeout=2)


def fresh_clone(tmp_path: Path) -> Path:
    """The files git tracks, as a clone would have them (without git: all but NOT_IN_A_CLONE)."""
    clone = tmp_path / "records_service"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=30) \
        if shutil.which("git") and (REPO / ".git").exists() else None
    if listed and listed.returncode == 0:
        for name in listed.stdout.decode().split("\0"):
            if name and (REPO / name).is_file():
                (clone / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, clone / name)
    else:
        shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(*NOT_IN_A_CLONE))
    (clone / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    return clone


def test_the_walkthrough_runs_as_written_and_prints_what_the_readme_shows(tmp_path):
    debian_command("curl", "curl")
    markdown = README.read_text()
    blocks = walkthrough_blocks(markdown)
    assert blocks and blocks[0].terminal == 1 and blocks[0].lines == [SETUP + SERVE], \
        "the walkthrough starts with the README's first command"
    assert sum(bool(PORT_LINE.match(line)) for block in blocks for line in block.lines) == 1, \
        "the walkthrough sets PORT=8000 once"

    clone, port = fresh_clone(tmp_path), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECORDS_", "GUNICORN_"))}
    server, shell = ServerTerminal(clone, env, port), Terminal(clone, env)
    try:
        for block in blocks:
            if block.terminal == 1:
                server.run(block.lines)
                continue
            for command in commands_of([PORT_LINE.sub(f"PORT={port}", line) for line in block.lines]):
                assert_prints(command, shell.run(command.text))
    finally:
        shell.close()
        server.interrupt()


def test_the_walkthrough_checks_what_it_shows():
    """Most commands state what they print, and a wrong statement would fail: the checker is no no-op."""
    commands = [c for b in walkthrough_blocks(README.read_text()) if b.terminal == 2 for c in commands_of(b.lines)]
    shown = [c for c in commands if c.expected]
    assert len(shown) >= 20 and len(shown) >= len(commands) * 2 // 3
    command = Command("curl …", ['HTTP/1.1 201 Created', '{"test_id": "T-0001", …"version": 1…}'])
    assert_prints(command, 'HTTP/1.1 201 Created\r\n\r\n{"test_id": "T-0001", "x": 1, "version": 1}')
    for printed in ['{"test_id": "T-0001", "version": 1}\nHTTP/1.1 201 Created',  # out of order
                    'HTTP/1.1 201 Created\n{"test_id": "T-0001",\n"version": 1}',  # not within one line
                    'HTTP/1.1 409 Conflict\n{"test_id": "T-0001", "version": 1}']:
        try:
            assert_prints(command, printed)
        except AssertionError:
            continue
        raise AssertionError(f"accepted {printed!r}")


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_the_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().splitlines()[-1]
    assert f"```sh\n{ci}\n```" in README.read_text()


def test_the_readme_stays_short_and_its_links_resolve():
    markdown = README.read_text()
    assert len(markdown.encode()) <= MAX_README_BYTES
    for target, anchor in re.findall(r"\]\(([^)#:]+)(?:#([^)]*))?\)", markdown):
        if target.startswith("../"):
            continue  # outside the repository: the shared contract
        assert (REPO / target).exists(), f"README links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", (REPO / target).read_text(), re.MULTILINE)
            assert anchor in {slug(heading) for heading in headings}, f"{target} has no heading #{anchor}"
