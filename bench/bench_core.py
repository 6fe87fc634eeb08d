"""Core benchmark: records_service against a bare Falcon app, same gunicorn, same load.

    .venv/bin/python bench/bench_core.py [--duration 10] [--connections 16] [--workers N]
                                         [--rounds 3] [--no-synchronous-compare] [--no-auth-compare]
                                         [--profile]

One run on this machine:
  1. installs wrk (`apt-get install -y wrk`) when it is missing;
  2. pre-fills a temporary database with 100,000 records over 1,000 clinics (100 a clinic)
     through records_service.store.Store.insert (the store owns all SQL);
  3. starts our service (`gunicorn -c gunicorn.conf.py`, default INFO logging to a file, auth
     off, RECORDS_SYNCHRONOUS=NORMAL) and bench/bare_app.py under the very same gunicorn
     settings (same config file, only the app differs), each on a free loopback port;
  4. measures what our service answers (POST record, 100-record page) and has the bare app
     answer constant bodies of exactly those sizes;
  5. GET /tests?clinic_id=<random pre-filled clinic>, then POST /tests with unique ids into
     random existing clinics (GET first, so every page read is the 100-record page): each
     scenario as --rounds pairs of wrk runs, alternating bare/ours (and which one goes first),
     after a short warm-up of each;
     With --auth-compare (the default) a third server, ours with RECORDS_AUTH=required on the
     same database ("ours-auth"), takes part in the same rounds; one API key (ingest and read,
     every clinic, made with keys.create_key) goes with every request to all three servers
     (BENCH_AUTHORIZATION, read by common.lua), so they receive the very same bytes;
  6. POST throughput of ours with RECORDS_SYNCHRONOUS=NORMAL against FULL, alternating;
  7. prints medians, ours/bare ratios and PASS/MISS against the targets (POST >= 0.60 of the
     bare app's requests/s with zero non-2xx, GET >= 0.50; ours-auth >= 0.90 of ours), and
     writes the raw runs as JSON to bench/results/ (git-ignored).
Every gunicorn it started is stopped at the end (SIGTERM, then wait), on error and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

import records_gen  # noqa: E402  (bench/ is sys.path[0] when run as a script)

VENV_BIN = Path(sys.executable).parent
GUNICORN = str(VENV_BIN / "gunicorn") if (VENV_BIN / "gunicorn").exists() else "gunicorn"
TARGETS = {"POST": 0.60, "GET": 0.50}
AUTH_TARGET = 0.90  # ours-auth keeps at least 90% of ours' requests/s
SCRIPTS = {"POST": BENCH_DIR / "post_tests.lua", "GET": BENCH_DIR / "get_tests.lua"}
PROBE_CLINIC = "C9999"  # sizing probes go here, outside the 1,000 clinics the load uses


class BenchError(RuntimeError):
    pass


def log(msg: str = "") -> None:
    print(msg, flush=True)


# -- environment -----------------------------------------------------------------------------

def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    log("wrk not found: installing Debian's package (apt-get install -y wrk)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    quiet = {"stdout": subprocess.DEVNULL}
    if subprocess.run(sudo + ["apt-get", "install", "-y", "wrk"], **quiet).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update"], **quiet, check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "wrk"], **quiet, check=True)
    path = shutil.which("wrk")
    if not path:
        raise BenchError("wrk is still missing after apt-get install -y wrk")
    return path


def gunicorn_config(env: dict) -> dict[str, str]:
    """gunicorn's fully resolved settings for `-c gunicorn.conf.py` (via --print-config)."""
    out = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", "--print-config"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"gunicorn --print-config failed:\n{out.stdout}{out.stderr}")
    settings = {}
    for line in out.stdout.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            settings[name.strip()] = value.strip()
    return settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> float:
    return os.getloadavg()[0]


def fs_type(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip() or "?"


# -- pre-fill ----------------------------------------------------------------------------------

def prefill(db_path: Path, clinics: int, per_clinic: int) -> float:
    """Store clinics*per_clinic records through Store.insert, as the service stores them."""
    from records_service.store import Store
    from records_service.validate import validate_record

    started = time.perf_counter()
    store = Store(str(db_path), synchronous="NORMAL")
    store.open()
    now = datetime.now(timezone.utc)
    try:
        for n, doc in enumerate(records_gen.prefill_records(clinics, per_clinic)):
            record, errors = validate_record(doc, now)
            if errors:
                raise BenchError(f"generated record is invalid: {errors}")
            if n % 1000 == 0:
                now = datetime.now(timezone.utc)
                stamp = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
            store.insert(record, request_id=str(uuid.uuid4()), now=stamp)
        count = store.count()
    finally:
        store.close()
    if count != clinics * per_clinic:
        raise BenchError(f"pre-fill stored {count} records, expected {clinics * per_clinic}")
    return time.perf_counter() - started


# -- servers ---------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict
    log_path: Path
    port: int
    proc: subprocess.Popen | None = None
    _log_file: object = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 60.0) -> None:
        self._log_file = open(self.log_path, "ab")
        # Own session: a Ctrl-C in the terminal reaches us, and we stop gunicorn in order.
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with status {self.proc.returncode} before answering\n"
                                 f"{self.output_tail()}")
            try:
                status, _ = self.request("GET", "/health", timeout=2)
                if status == 200:
                    return
                last_error = f"GET /health answered {status}"
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.2)
        raise BenchError(f"{self.name} did not answer on {self.url} within {ready_timeout:.0f}s "
                         f"({last_error})\n{self.output_tail()}")

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 10,
                headers: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {**({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def worker_pids(self) -> list[int]:
        if not self.proc:
            return []
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return []
        return [int(c) for c in children]

    def workers_cpu_s(self) -> float:
        """CPU seconds (user + system) the workers have used so far: per request, a figure that
        other load on a shared machine disturbs far less than requests per second."""
        ticks = 0
        for pid in self.worker_pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # a worker that just exited
            ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
        return ticks / os.sysconf("SC_CLK_TCK")

    def output_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server output)"
        return f"--- last {min(lines, len(text))} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])

    def stop(self, timeout: float = 40.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # gunicorn master: graceful stop of its workers
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: still running {timeout:.0f}s after SIGTERM; SIGKILL to its process group")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Workers are children of the master, in its process group; none should be left.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self._log_file:
            self._log_file.close()
        self.proc = None


def stop_all(servers: list[Server]) -> None:
    """Stop every server, the last started first; finish even if told twice or one fails."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for server in reversed(servers):
        try:
            server.stop()
        except Exception as exc:  # keep stopping the others
            log(f"could not stop {server.name}: {exc}")


def gunicorn_argv(port: int, workers: int, app: str | None) -> list[str]:
    # Both apps: the same config file, so every gunicorn setting is the same; only the app differs.
    argv = [GUNICORN, "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}", "-w", str(workers), "--no-control-socket"]
    if app:
        argv += ["--pythonpath", str(BENCH_DIR), app]
    return argv


# -- load ------------------------------------------------------------------------------------

@dataclass
class Run:
    scenario: str
    app: str
    round: int
    result: dict
    load_before: float
    wrk_output: str = field(repr=False, default="")


def run_wrk(wrk: str, scenario: str, url: str, args: argparse.Namespace, duration: float,
            script_args: Sequence[str] = ()) -> tuple[dict, str]:
    nonce = secrets.token_hex(4)  # new every run: POST test_ids never repeat across runs
    cmd = [wrk, "-t", str(args.threads), "-c", str(args.connections), "-d", f"{duration}s",
           "--timeout", f"{args.timeout}s", "--latency", "-s", str(SCRIPTS[scenario]), url, "--", nonce,
           *script_args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    match = re.search(r"^BENCH_RESULT (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not match:
        raise BenchError(f"wrk failed ({out.returncode}): {shlex.join(cmd)}\n{out.stdout}{out.stderr}")
    result = json.loads(match.group(1))
    result["socket_errors"] = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return result, out.stdout


def fmt_run(run: Run) -> str:
    r = run.result
    errs = f" socket_errors={r['socket_errors']}" if r["socket_errors"] else ""
    return (f"  {run.scenario:4} {run.app:12} round {run.round}: {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms"
            f"  p99 {r['p99_ms']:7.2f} ms  non-2xx {r['non2xx']}{errs}  (load avg before {run.load_before:.2f})")


def measure(wrk: str, scenario: str, servers: list[Server], args: argparse.Namespace, runs: list[Run],
            script_args: Callable[[Server], Sequence[str]] = lambda server: ()) -> None:
    """Warm each server up, then --rounds rounds, alternating which server goes first.
    `script_args` gives the Lua script's arguments after the nonce, asked anew for every run."""
    for server in servers:
        run_wrk(wrk, scenario, server.url, args, args.warmup, script_args(server))
    for rnd in range(1, args.rounds + 1):
        order = servers if rnd % 2 else list(reversed(servers))
        for server in order:
            before, cpu_before = loadavg(), server.workers_cpu_s()
            result, output = run_wrk(wrk, scenario, server.url, args, args.duration, script_args(server))
            result["cpu_ms_per_req"] = 1000 * (server.workers_cpu_s() - cpu_before) / max(result["requests"], 1)
            run = Run(scenario, server.name, rnd, result, before, output)
            runs.append(run)
            log(fmt_run(run))


def summarise(runs: list[Run], scenario: str, app: str) -> dict:
    mine = [r.result for r in runs if r.scenario == scenario and r.app == app]
    return {
        "runs": len(mine),
        "rps": statistics.median(r["rps"] for r in mine),
        "p50_ms": statistics.median(r["p50_ms"] for r in mine),
        "p99_ms": statistics.median(r["p99_ms"] for r in mine),
        "non2xx": sum(r["non2xx"] for r in mine),
        "socket_errors": sum(r["socket_errors"] for r in mine),
        "requests": sum(r["requests"] for r in mine),
        "rps_all": [round(r["rps"], 1) for r in mine],
        "cpu_ms_per_req": statistics.median(r["cpu_ms_per_req"] for r in mine),
    }


def paired_ratios(runs: list[Run], scenario: str, app: str, baseline: str) -> list[float]:
    """app/baseline req/s of each round: the two runs of a round are minutes apart at most, so
    drift in the machine's other load cancels out more than between medians."""
    rps = {(r.app, r.round): r.result["rps"] for r in runs if r.scenario == scenario}
    return [rps[(app, n)] / rps[(baseline, n)] for (name, n) in rps if name == app and (baseline, n) in rps]


def start_with_auth(db_path: Path, workers: int, ours_env: dict, tmp: Path) -> Server:
    """Ours with RECORDS_AUTH=required on the same database, and one key that wrk sends to every
    server from now on (common.lua reads BENCH_AUTHORIZATION; the others ignore the header).
    The key is made as `keys create` makes it and never printed."""
    from records_service import keys
    from records_service.store import Store

    store = Store(str(db_path))
    key_id, token = keys.create_key(store, name="bench", roles=["ingest", "read"], clinics=None,
                                    now=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"))
    store.close()
    os.environ["BENCH_AUTHORIZATION"] = f"Bearer {token}"  # wrk inherits this process's environment
    port = free_port()
    server = Server("ours-auth", gunicorn_argv(port, workers, None), {**ours_env, "RECORDS_AUTH": "required"},
                    tmp / "ours-auth.log", port)
    server.start()
    probe = "/tests?clinic_id=" + records_gen.clinic_id(1)
    statuses = (server.request("GET", probe, headers={"Authorization": f"Bearer {token}"})[0],
                server.request("GET", probe)[0])
    if statuses != (200, 401):
        raise BenchError(f"ours-auth answered {statuses} with and without the key, expected (200, 401)")
    log(f"ours-auth on {server.url} (pid {server.proc.pid}), RECORDS_AUTH=required, key {key_id}: "
        + shlex.join(server.argv))
    return server


# -- sizing ------------------------------------------------------------------------------------

def measure_body_sizes(ours: Server, clinics: int, samples: int = 20) -> tuple[int, int]:
    """Mean size of what ours answers: a POST /tests record (probes stored in PROBE_CLINIC, so
    the load's clinics keep 100 records) and a GET /tests page of a pre-filled clinic."""
    rng = random.Random(7)
    post_sizes, get_sizes = [], []
    nonce = secrets.token_hex(4)
    for i in range(samples):
        # Thread number 99: never one of wrk's, so no clash with the load's ids.
        record = records_gen.make_record(records_gen.bench_test_id(nonce, 99, i + 1), PROBE_CLINIC, rng)
        status, body = ours.request("POST", "/tests", json.dumps(record).encode())
        if status != 201:
            raise BenchError(f"sizing POST answered {status}: {body[:500]!r}")
        post_sizes.append(len(body))
        clinic = records_gen.clinic_id(rng.randint(1, clinics))
        status, body = ours.request("GET", f"/tests?clinic_id={clinic}")
        if status != 200:
            raise BenchError(f"sizing GET answered {status}: {body[:500]!r}")
        get_sizes.append(len(body))
    return round(statistics.mean(post_sizes)), round(statistics.mean(get_sizes))


def check_bare_sizes(bare: Server, post_bytes: int, get_bytes: int) -> None:
    status, body = bare.request("POST", "/tests", b'{"test_id": "x"}')
    if status != 201 or len(body) != post_bytes:
        raise BenchError(f"bare POST answered {status} with {len(body)} bytes, expected 201 with {post_bytes}")
    status, body = bare.request("GET", "/tests?clinic_id=C0001")
    if status != 200 or len(body) != get_bytes:
        raise BenchError(f"bare GET answered {status} with {len(body)} bytes, expected 200 with {get_bytes}")


# -- profile (optional) ----------------------------------------------------------------------

def profile(wrk: str, scenario: str, server: Server, args: argparse.Namespace, out_dir: Path) -> Path:
    """Load `server` for --duration while py-spy samples all its workers (after the measured
    runs, so sampling does not disturb them); print where the workers' CPU time goes."""
    py_spy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if not py_spy:
        raise BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
    raw = out_dir / f"profile-{scenario.lower()}-{server.name}.txt"
    spy = subprocess.Popen([py_spy, "record", "--pid", str(server.proc.pid), "--subprocesses", "--nolineno",
                            "--format", "raw", "--rate", "250", "--duration", str(args.duration + 1),
                            "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1)  # let py-spy attach before the load starts
    result, _ = run_wrk(wrk, scenario, server.url, args, args.duration)
    _, err = spy.communicate(timeout=args.duration + 60)
    if spy.returncode != 0 or not raw.exists():
        raise BenchError(f"py-spy failed ({spy.returncode}): {err}")
    log(f"\n[profile] {scenario} /tests on {server.name} under py-spy (250 Hz, on-CPU samples only): "
        f"{result['rps']:.1f} req/s; raw stacks: {raw}")
    # On ours-auth, how much of the workers' CPU authentication takes: what it can cost req/s.
    focus = "Authenticate.process_resource" if server.name == "ours-auth" else None
    log(profile_summary(raw, top=args.profile_top, focus=focus))
    return raw


# Frames every worker stack starts with (gunicorn boot and the worker loop): not informative.
_BOOT_FRAMES = re.compile(r"\((gunicorn/app/|gunicorn/arbiter\.py|gunicorn\)$)|^<module> |"
                          r"^SyncWorker\.(run|run_for_one|accept) |^Worker\.init_process ")


def _frame_file(frame: str) -> str:
    return frame[frame.rfind("(") + 1:].rstrip(")")


def _module_group(frame: str) -> str:
    path = _frame_file(frame)
    if path.startswith("records_service/"):
        return path if path != "records_service/store.py" else "records_service/store.py (incl. sqlite3 C calls)"
    for lib in ("falcon", "gunicorn"):
        if f"{lib}/" in path:
            return lib
    top = path.split("/", 1)[0]
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    return f"stdlib {top.removesuffix('.py')}"


def profile_summary(raw: Path, top: int = 20, focus: str | None = None) -> str:
    """Self time by module, then self and inclusive time per function, from py-spy's collapsed
    stacks (idle excluded, so the shares are of the workers' CPU time)."""
    inclusive: dict[str, int] = {}
    self_time: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
        self_time[frames[-1]] = self_time.get(frames[-1], 0) + n
    if not total:
        return "  (no samples)"
    groups: dict[str, int] = {}
    for frame, n in self_time.items():
        groups[_module_group(frame)] = groups.get(_module_group(frame), 0) + n
    lines = [f"  {total} on-CPU samples over all workers; self time by module:"]
    if focus:
        share = sum(n for frame, n in inclusive.items() if frame.startswith(focus + " "))
        lines.insert(0, f"  {focus} and all it calls: {100 * share / total:.1f}% of the workers' on-CPU samples")
    lines += [f"  {100 * n / total:5.1f}%  {g}" for g, n in sorted(groups.items(), key=lambda kv: -kv[1])[:12]]
    by_self = sorted(self_time.items(), key=lambda kv: -kv[1])[:top]
    by_incl = sorted(((f, n) for f, n in inclusive.items() if not _BOOT_FRAMES.search(f)),
                     key=lambda kv: -kv[1])[:top]
    lines.append(f"  {'self%':>6}  {'function (file)':58}| {'incl%':>6}  function (file)")
    for i in range(top):
        left = f"{100 * by_self[i][1] / total:6.1f}  {by_self[i][0][:58]:58}" if i < len(by_self) else " " * 66
        right = f"{100 * by_incl[i][1] / total:6.1f}  {by_incl[i][0][:70]}" if i < len(by_incl) else ""
        lines.append(f"  {left}| {right}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    """'func (/abs/path/site-packages/falcon/app.py)' -> 'func (falcon/app.py)'."""
    for prefix in (str(ROOT) + "/", "site-packages/"):
        i = frame.find(prefix)
        if i != -1:
            frame = frame[:frame.rfind("(", 0, i + 1) + 1] + frame[i + len(prefix):]
    frame = re.sub(r"\(/[^()]*/lib/python3\.\d+/", "(", frame)
    return frame


# -- report ----------------------------------------------------------------------------------

def report(runs: list[Run], scenarios: list[str], sync_runs: list[Run], args, sizes, settings) -> tuple[str, bool]:
    out = []
    all_pass = True
    out.append("")
    out.append(f"== records_service vs bare Falcon: median of {args.rounds} rounds x {args.duration:g}s, "
               f"{args.connections} connections, {args.threads} wrk threads, gunicorn "
               f"{settings.get('worker_class')} x {args.workers} workers ==")
    out.append(f"   body bytes: POST {sizes[0]}, GET {sizes[1]} (ours, mean; bare answers exactly these)")
    header = (f"{'scenario':9}{'app':6}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>9}"
              f"{'sock err':>10}   per-round req/s")
    out.append(header)
    out.append("-" * len(header))
    ratios = {}
    for scenario in scenarios:
        s = {app: summarise(runs, scenario, app) for app in ("bare", "ours")}
        for app in ("bare", "ours"):
            m = s[app]
            out.append(f"{scenario:9}{app:6}{m['rps']:10.1f}{m['p50_ms']:10.2f}{m['p99_ms']:10.2f}"
                       f"{m['non2xx']:9d}{m['socket_errors']:10d}   {m['rps_all']}")
        ratio = s["ours"]["rps"] / s["bare"]["rps"]
        ratios[scenario] = (ratio, s)
    out.append("")
    for scenario in scenarios:
        ratio, s = ratios[scenario]
        target = TARGETS[scenario]
        ok = ratio >= target and s["ours"]["non2xx"] == 0
        all_pass &= ok
        why = [] if ok else ([f"ratio below {target:.2f}"] if ratio < target else []) + (
            [f"{s['ours']['non2xx']} non-2xx"] if s["ours"]["non2xx"] else [])
        out.append(f"{scenario:5} ours/bare: req/s {ratio:.3f}   p50 {s['ours']['p50_ms'] / s['bare']['p50_ms']:.2f}x"
                   f"   p99 {s['ours']['p99_ms'] / s['bare']['p99_ms']:.2f}x   target >= {target:.2f} with zero"
                   f" non-2xx: {'PASS' if ok else 'MISS (' + ', '.join(why) + ')'}")
        if s["ours"]["socket_errors"] or s["bare"]["socket_errors"]:
            out.append(f"      note: socket errors (connect/read/write/timeout): ours {s['ours']['socket_errors']},"
                       f" bare {s['bare']['socket_errors']}")
    if args.auth_compare:
        out.append("")
        out.append(f"== RECORDS_AUTH: ours-auth (required, a key looked up on every request) vs ours (disabled),"
                   f" same rounds ==")
        for scenario in scenarios:
            on, off = summarise(runs, scenario, "ours-auth"), summarise(runs, scenario, "ours")
            out.append(f"{scenario:9}{'auth':6}{on['rps']:10.1f}{on['p50_ms']:10.2f}{on['p99_ms']:10.2f}"
                       f"{on['non2xx']:9d}{on['socket_errors']:10d}   {on['rps_all']}")
        for scenario in scenarios:
            on, off = summarise(runs, scenario, "ours-auth"), summarise(runs, scenario, "ours")
            ratio = on["rps"] / off["rps"]
            paired = statistics.median(paired_ratios(runs, scenario, "ours-auth", "ours"))
            ok = ratio >= AUTH_TARGET and on["non2xx"] == 0
            all_pass &= ok
            out.append(f"{scenario:5} auth/ours: req/s {ratio:.3f} ({100 * (ratio - 1):+.1f}%), median of per-round "
                       f"ratios {paired:.3f}   p50 {on['p50_ms'] / off['p50_ms']:.2f}x   p99 "
                       f"{on['p99_ms'] / off['p99_ms']:.2f}x   target >= {AUTH_TARGET:.2f} with zero non-2xx: "
                       f"{'PASS' if ok else 'MISS'}")
            out.append(f"      worker CPU per request (median): ours {off['cpu_ms_per_req']:.3f} ms, ours-auth "
                       f"{on['cpu_ms_per_req']:.3f} ms ({100 * (on['cpu_ms_per_req'] / off['cpu_ms_per_req'] - 1):+.1f}%)")
    if sync_runs:
        n = summarise(sync_runs, "POST", "ours-NORMAL")
        f = summarise(sync_runs, "POST", "ours-FULL")
        out.append("")
        out.append(f"== RECORDS_SYNCHRONOUS: POST /tests on ours, median of {args.rounds} rounds ==")
        out.append(header)
        out.append("-" * len(header))
        for label, m in (("NORMAL", n), ("FULL", f)):
            out.append(f"{'POST':9}{label:6}{m['rps']:10.1f}{m['p50_ms']:10.2f}{m['p99_ms']:10.2f}"
                       f"{m['non2xx']:9d}{m['socket_errors']:10d}   {m['rps_all']}")
        out.append(f"FULL/NORMAL: req/s {f['rps'] / n['rps']:.3f} ({100 * (1 - f['rps'] / n['rps']):+.1f}% cost),"
                   f" p50 {f['p50_ms'] / n['p50_ms']:.2f}x, p99 {f['p99_ms'] / n['p99_ms']:.2f}x")
    return "\n".join(out), all_pass


# -- main ------------------------------------------------------------------------------------

def load_arguments(doc: str, pairs: str) -> argparse.ArgumentParser:
    """A parser with the load options every benchmark here takes; `pairs` names what a round compares."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (whole seconds: wrk)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections")
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--workers", type=int, default=None,
                   help="gunicorn workers for every server (default: what gunicorn.conf.py resolves to)")
    p.add_argument("--rounds", type=int, default=3, help=f"{pairs} pairs per scenario; medians are reported")
    p.add_argument("--warmup", type=int, default=2, help="seconds of unrecorded load per server and scenario")
    p.add_argument("--timeout", type=int, default=5, help="wrk request timeout, seconds")
    return p


def parse_load_arguments(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = p.parse_args(argv)
    if min(args.duration, args.warmup, args.timeout, args.rounds, args.connections, args.threads) < 1:
        p.error("--duration, --warmup, --timeout, --rounds, --connections and --threads must be at least 1")
    return args


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = load_arguments(__doc__, "bare/ours")
    p.add_argument("--scenarios", default="GET,POST", help="comma-separated, run in this order (GET first "
                   "keeps every page at 100 records)")
    p.add_argument("--synchronous-compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare POST throughput of ours with RECORDS_SYNCHRONOUS=NORMAL and FULL")
    p.add_argument("--auth-compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure ours with RECORDS_AUTH=required (a key on every request) in the same rounds")
    p.add_argument("--clinics", type=int, default=records_gen.CLINICS, help=argparse.SUPPRESS)
    p.add_argument("--per-clinic", type=int, default=records_gen.RECORDS_PER_CLINIC, help=argparse.SUPPRESS)
    p.add_argument("--tmpdir", default=None, help="where the temporary database and server logs go")
    p.add_argument("--keep-tmp", action="store_true", help="keep the database and server logs")
    p.add_argument("--profile", action="store_true",
                   help="after measuring, load ours once more per scenario under py-spy and print the top functions")
    p.add_argument("--profile-top", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write raw runs here (default bench/results/core-<time>.json)")
    p.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    args = parse_load_arguments(p, argv)
    args.scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenarios or set(args.scenarios) - set(SCRIPTS):
        p.error("--scenarios takes GET and/or POST")
    if args.clinics != records_gen.CLINICS:
        p.error("the Lua scripts use 1,000 clinics")  # kept hidden: only for the pre-fill size
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    log("command: " + shlex.join([os.path.relpath(sys.executable, Path.cwd()), *sys.argv]))
    wrk = ensure_wrk()

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RECORDS_") and not k.startswith("BENCH_")}
    tmp = Path(tempfile.mkdtemp(prefix="records-bench-", dir=args.tmpdir))
    db_path = tmp / "records.db"
    ours_env = {**base_env, "RECORDS_DB_PATH": str(db_path), "RECORDS_AUTH": "disabled",
                "RECORDS_LOG_LEVEL": "INFO", "RECORDS_SYNCHRONOUS": "NORMAL"}
    settings = gunicorn_config(ours_env)
    if args.workers is None:
        args.workers = int(settings["workers"])
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    import falcon
    import gunicorn
    log(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"Python {platform.python_version()}, falcon {falcon.__version__}, gunicorn {gunicorn.__version__}, "
        f"{' '.join(wrk_version)[:40]}")
    log(f"gunicorn (both apps, -c gunicorn.conf.py): worker_class={settings.get('worker_class')} "
        f"workers={args.workers} timeout={settings.get('timeout')} graceful_timeout={settings.get('graceful_timeout')} "
        f"keepalive={settings.get('keepalive')} backlog={settings.get('backlog')}")
    log(f"temp dir: {tmp} ({fs_type(tmp)}); server output in {tmp}/*.log")

    servers: list[Server] = []
    runs: list[Run] = []
    sync_runs: list[Run] = []

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        total = args.clinics * args.per_clinic
        log(f"pre-filling {total:,} records over {args.clinics:,} clinics via Store.insert ...")
        log(f"  done in {prefill(db_path, args.clinics, args.per_clinic):.1f}s")

        ours_port = free_port()
        ours = Server("ours", gunicorn_argv(ours_port, args.workers, None), ours_env, tmp / "ours.log", ours_port)
        servers.append(ours)
        ours.start()
        sizes = measure_body_sizes(ours, args.clinics)
        log(f"ours answers: POST /tests {sizes[0]} bytes, GET /tests ({args.per_clinic} records) {sizes[1]} bytes (means)")

        bare_env = {**base_env, "BENCH_POST_BODY_BYTES": str(sizes[0]), "BENCH_GET_BODY_BYTES": str(sizes[1]),
                    "BENCH_GET_RECORDS": str(args.per_clinic)}
        bare_port = free_port()
        bare = Server("bare", gunicorn_argv(bare_port, args.workers, "bare_app:create_app()"), bare_env,
                      tmp / "bare.log", bare_port)
        servers.append(bare)
        bare.start()
        check_bare_sizes(bare, *sizes)
        log(f"ours on {ours.url} (pid {ours.proc.pid}), bare on {bare.url} (pid {bare.proc.pid})")
        log("first command lines:\n  ours: " + shlex.join(ours.argv) + "\n  bare: " + shlex.join(bare.argv))

        compared = [bare, ours]
        if args.auth_compare:
            auth = start_with_auth(db_path, args.workers, ours_env, tmp)
            servers.append(auth)
            compared.append(auth)
        for scenario in args.scenarios:
            log(f"\n{scenario} /tests: warm-up {args.warmup:g}s each, then {args.rounds} rounds")
            measure(wrk, scenario, compared, args, runs)
        if args.auth_compare:
            auth.stop()

        if args.synchronous_compare:
            bare.stop()
            full_port = free_port()
            full = Server("ours-FULL", gunicorn_argv(full_port, args.workers, None),
                          {**ours_env, "RECORDS_SYNCHRONOUS": "FULL"}, tmp / "ours-full.log", full_port)
            servers.append(full)
            full.start()
            ours.name = "ours-NORMAL"
            log(f"\nRECORDS_SYNCHRONOUS NORMAL vs FULL, POST /tests: warm-up {args.warmup:g}s each, "
                f"then {args.rounds} rounds")
            measure(wrk, "POST", [ours, full], args, sync_runs)
            ours.name = "ours"
            full.stop()

        text, all_pass = report(runs, args.scenarios, sync_runs, args, sizes, settings)
        log(text)

        if args.profile:
            if args.synchronous_compare:  # the bare app was stopped for the synchronous part
                bare.start()
            if args.auth_compare:  # stopped after its rounds, to leave the machine to the others
                auth.start()
                compared = [ours, bare, auth]
            for scenario in args.scenarios:
                for server in compared:
                    profile(wrk, scenario, server, args, tmp)

        json_path = Path(args.json) if args.json else BENCH_DIR / "results" / (
            "core-" + datetime.now().strftime("%Y%m%d-%H%M%S") + f"-w{args.workers}.json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({
            "command": [sys.executable, *sys.argv], "args": {k: v for k, v in vars(args).items()},
            "body_bytes": {"POST": sizes[0], "GET": sizes[1]},
            "runs": [{"scenario": r.scenario, "app": r.app, "round": r.round, "load_before": r.load_before,
                      **r.result} for r in runs + sync_runs],
        }, indent=1))
        log(f"\nraw runs: {json_path}")
        return 0 if all_pass or not args.fail_on_miss else 1
    except BenchError as exc:
        log(f"\nbenchmark failed: {exc}")
        return 2
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    finally:
        stop_all(servers)
        if args.keep_tmp or args.profile:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
