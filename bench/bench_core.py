"""Core benchmark: records_service against a bare Falcon app, same gunicorn, same load.

    .venv/bin/python bench/bench_core.py [--duration 10] [--connections 16] [--workers N]
                                         [--rounds 3] [--no-synchronous-compare] [--no-auth-compare]
                                         [--profile] [--ours-app MODULE:CALLABLE]    (see --help)

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

The machine is shared: before each measured run the script waits (up to --quiet-wait s) for
other processes to go quiet, and every run line shows the CPU cores used by our servers, by
wrk and by everything else ("other"). Runs with "other" well above 0 are not comparable.
`--profile` adds py-spy samples of each server's workers (bare, ours and ours-auth) under each
load (after the measured runs), with Authenticate.process_resource's share on ours-auth;
bench/profile_app.py gives the cleaner per-request CPU breakdown of our app alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import resource
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


_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSnapshot:
    busy: int  # machine-wide jiffies, idle/iowait/steal excluded
    steal: int
    servers: int  # jiffies of every process in our gunicorn sessions (masters and workers)
    servers_sys: int  # of which in the kernel
    children: float  # seconds of reaped children of this process (wrk)
    wall: float


def cpu_snapshot(server_sids: set[int]) -> CpuSnapshot:
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    servers = servers_sys = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        if int(rest[3]) in server_sids:  # session id: each gunicorn runs in a session of its own
            servers += int(rest[11]) + int(rest[12])
            servers_sys += int(rest[12])
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return CpuSnapshot(user + nice + system + irq + softirq, steal, servers, servers_sys, ru.ru_utime + ru.ru_stime,
                       time.monotonic())


def cpu_use(before: CpuSnapshot, after: CpuSnapshot) -> dict:
    """Average cores used during a run: by our servers, by wrk, by everything else on the
    machine (the noise of a shared machine), and stolen by the hypervisor."""
    wall = after.wall - before.wall
    servers = (after.servers - before.servers) / _TICK / wall  # the idle server's share is ~0
    wrk = (after.children - before.children) / wall
    busy = (after.busy - before.busy) / _TICK / wall
    sys_share = (after.servers_sys - before.servers_sys) / max(1, after.servers - before.servers)
    return {"cpu_servers": round(servers, 2), "cpu_servers_sys_share": round(sys_share, 2), "cpu_wrk": round(wrk, 2),
            "cpu_other": round(max(0.0, busy - servers - wrk), 2),
            "cpu_steal": round((after.steal - before.steal) / _TICK / wall, 2)}


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
    steal = f" steal {r['cpu_steal']:.2f}" if r["cpu_steal"] >= 0.05 else ""
    return (f"  {run.scenario:4} {run.app:12} round {run.round}: {r['rps']:8.1f} req/s  p50 {r['p50_ms']:6.2f} ms"
            f"  p99 {r['p99_ms']:6.2f} ms  non-2xx {r['non2xx']}{errs}  | server CPU {r['cpu_us_per_req']:5.0f} us/req;"
            f" cores: servers {r['cpu_servers']:.2f} ({100 * r['cpu_servers_sys_share']:.0f}% sys)"
            f" wrk {r['cpu_wrk']:.2f} other {r['cpu_other']:.2f}{steal}")


def wait_for_quiet(args: argparse.Namespace, sids: set[int]) -> tuple[float, float]:
    """Wait (at most --quiet-wait s) until processes other than ours use less than --quiet-below
    cores, measured over one second while our servers are idle; return (seconds waited, last
    measured other load)."""
    started = time.monotonic()
    told = False
    while True:
        before = cpu_snapshot(sids)
        time.sleep(1)
        other = cpu_use(before, cpu_snapshot(sids))["cpu_other"]
        waited = time.monotonic() - started - 1
        if other < args.quiet_below or waited >= args.quiet_wait:
            if told:
                log(f"    ... waited {waited:.0f}s; other processes now use {other:.2f} cores"
                    + ("" if other < args.quiet_below else " (gave up waiting: this run is noisy)"))
            return waited, other
        if not told:
            log(f"    other processes use {other:.2f} cores: waiting up to {args.quiet_wait}s for less than "
                f"{args.quiet_below:g}")
            told = True


def measure(wrk: str, scenario: str, servers: list[Server], args: argparse.Namespace, runs: list[Run],
            script_args: Callable[[Server], Sequence[str]] = lambda server: (),
            all_servers: Sequence[Server] | None = None) -> None:
    """Warm each server up, then --rounds rounds, alternating which server goes first.
    `script_args` gives the Lua script's arguments after the nonce, asked anew for every run.
    `all_servers` (default: `servers`) are every gunicorn of ours that may be running, idle or
    not: their CPU counts as the servers', not as other processes' (quiet wait, CPU snapshots)."""
    for server in servers:
        run_wrk(wrk, scenario, server.url, args, args.warmup, script_args(server))
    for rnd in range(1, args.rounds + 1):
        order = servers if rnd % 2 else list(reversed(servers))
        for server in order:
            sids = {s.proc.pid for s in (all_servers or servers) if s.proc}
            waited, _ = wait_for_quiet(args, sids) if args.quiet_wait > 0 else (0.0, 0.0)
            before = cpu_snapshot(sids)
            result, output = run_wrk(wrk, scenario, server.url, args, args.duration, script_args(server))
            result.update(cpu_use(before, cpu_snapshot(sids)))
            result["cpu_us_per_req"] = round(result["cpu_servers"] * 1e6 / result["rps"], 1) if result["rps"] else 0.0
            result["wrk_cpu_us_per_req"] = round(result["cpu_wrk"] * 1e6 / result["rps"], 1) if result["rps"] else 0.0
            result["quiet_wait_s"] = round(waited, 1)
            run = Run(scenario, server.name, rnd, result, output)
            runs.append(run)
            log(fmt_run(run))


def summarise(runs: list[Run], scenario: str, app: str, quiet_below: float = 0.25) -> dict:
    mine = [r.result for r in runs if r.scenario == scenario and r.app == app]
    return {
        "noisy": sum(r["cpu_other"] >= quiet_below for r in mine),
        "runs": len(mine),
        "rps": statistics.median(r["rps"] for r in mine),
        "p50_ms": statistics.median(r["p50_ms"] for r in mine),
        "p99_ms": statistics.median(r["p99_ms"] for r in mine),
        "non2xx": sum(r["non2xx"] for r in mine),
        "socket_errors": sum(r["socket_errors"] for r in mine),
        "cpu_other": statistics.median(r["cpu_other"] for r in mine),
        "cpu_us_per_req": statistics.median(r["cpu_us_per_req"] for r in mine),
        "wrk_cpu_us_per_req": statistics.median(r["wrk_cpu_us_per_req"] for r in mine),
        "requests": sum(r["requests"] for r in mine),
        "rps_all": [round(r["rps"], 1) for r in mine],
    }


def start_with_auth(db_path: Path, workers: int, app: str | None, ours_env: dict, tmp: Path) -> Server:
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
    server = Server("ours-auth", gunicorn_argv(port, workers, app), {**ours_env, "RECORDS_AUTH": "required"},
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
                            "--format", "raw", "--rate", "250", "--nonblocking", "--duration", str(args.duration + 1),
                            "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1)  # let py-spy attach before the load starts
    result, _ = run_wrk(wrk, scenario, server.url, args, args.duration)
    _, err = spy.communicate(timeout=args.duration + 60)
    if spy.returncode != 0 or not raw.exists():
        raise BenchError(f"py-spy failed ({spy.returncode}): {err}")
    log(f"\n[profile] {scenario} /tests on {server.name} under py-spy (250 Hz, non-blocking; samples py-spy counts as not idle, which include waits in socket calls): "
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
    stacks (samples py-spy judged idle are not recorded)."""
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
    lines = [f"  {total} non-idle samples over all processes; self time by module:"]
    if focus:
        share = sum(n for frame, n in inclusive.items() if frame.startswith(focus + " "))
        lines.insert(0, f"  {focus} and all it calls: {100 * share / total:.1f}% of the non-idle samples")
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

def pair_ratios(runs: list[Run], scenario: str, num: str, den: str) -> list[float]:
    """num/den req/s of the two runs of each round (run back to back, so under similar noise)."""
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if r.scenario == scenario:
            by_round.setdefault(r.round, {})[r.app] = r.result["rps"]
    return [round(v[num] / v[den], 3) for _, v in sorted(by_round.items()) if num in v and den in v and v[den]]


def verdict(ratio: float, target: float, non2xx: int) -> tuple[bool, str]:
    ok = ratio >= target and non2xx == 0
    why = ([f"ratio below {target:.2f}"] if ratio < target else []) + ([f"{non2xx} non-2xx"] if non2xx else [])
    return ok, f"target >= {target:.2f} with zero non-2xx: " + ("PASS" if ok else f"MISS ({', '.join(why)})")


def row(scenario: str, label: str, m: dict) -> str:
    return (f"{scenario:9}{label:10}{m['rps']:9.1f}{m['p50_ms']:9.2f}{m['p99_ms']:9.2f}{m['non2xx']:9d}"
            f"{m['socket_errors']:9d}{m['cpu_us_per_req']:11.0f}{m['cpu_other']:10.2f}   {m['rps_all']}")


def report(runs: list[Run], scenarios: list[str], sync_runs: list[Run], args, sizes, settings) -> tuple[str, bool]:
    out = []
    all_pass = True
    out.append("")
    out.append(f"== records_service vs bare Falcon: median of {args.rounds} rounds x {args.duration:g}s, "
               f"{args.connections} connections, {args.threads} wrk threads, gunicorn "
               f"{settings.get('worker_class')} x {args.workers} workers ==")
    out.append(f"   body bytes: POST {sizes[0]}, GET {sizes[1]} (ours, mean; bare answers exactly these)")
    header = (f"{'scenario':9}{'app':10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}"
              f"{'sock err':>9}{'CPU us/req':>11}{'other CPU':>10}   per-round req/s")
    out.append(header)
    out.append("-" * len(header))
    apps = ("bare", "ours", "ours-auth") if args.auth_compare else ("bare", "ours")
    medians = {}
    for scenario in scenarios:
        medians[scenario] = {app: summarise(runs, scenario, app, args.quiet_below) for app in apps}
        for app in apps:
            out.append(row(scenario, app, medians[scenario][app]))
    out.append("")
    for scenario in scenarios:
        s = medians[scenario]
        ratio = s["ours"]["rps"] / s["bare"]["rps"]
        ok, verdict_text = verdict(ratio, TARGETS[scenario], s["ours"]["non2xx"])
        all_pass &= ok
        pairs = pair_ratios(runs, scenario, "ours", "bare")
        out.append(f"{scenario:5} ours/bare: req/s {ratio:.3f}   p50 {s['ours']['p50_ms'] / s['bare']['p50_ms']:.2f}x"
                   f"   p99 {s['ours']['p99_ms'] / s['bare']['p99_ms']:.2f}x   {verdict_text}")
        cost = ((s["bare"]["cpu_us_per_req"] + s["bare"]["wrk_cpu_us_per_req"])
                / (s["ours"]["cpu_us_per_req"] + s["ours"]["wrk_cpu_us_per_req"]))
        out.append(f"      cross-checks: per-round ratios {pairs} (median {statistics.median(pairs):.3f}); "
                   f"CPU-cost ratio {cost:.3f} (bare/ours server+wrk CPU per request)")
        if s["ours"]["socket_errors"] or s["bare"]["socket_errors"]:
            out.append(f"      note: socket errors (connect/read/write/timeout): ours {s['ours']['socket_errors']},"
                       f" bare {s['bare']['socket_errors']}")
    if args.auth_compare:
        out.append("")
        out.append("== RECORDS_AUTH: ours-auth (required, a key looked up on every request) vs ours (disabled),"
                   " same rounds (rows above) ==")
        for scenario in scenarios:
            on, off = medians[scenario]["ours-auth"], medians[scenario]["ours"]
            ratio = on["rps"] / off["rps"]
            ok, verdict_text = verdict(ratio, AUTH_TARGET, on["non2xx"])
            all_pass &= ok
            pairs = pair_ratios(runs, scenario, "ours-auth", "ours")
            out.append(f"{scenario:5} auth/ours: req/s {ratio:.3f} ({100 * (ratio - 1):+.1f}%)   p50 "
                       f"{on['p50_ms'] / off['p50_ms']:.2f}x   p99 {on['p99_ms'] / off['p99_ms']:.2f}x   {verdict_text}")
            out.append(f"      cross-checks: per-round ratios {pairs} (median {statistics.median(pairs):.3f}); server "
                       f"CPU per request ours {off['cpu_us_per_req']:.0f} us, ours-auth {on['cpu_us_per_req']:.0f} us"
                       f" ({100 * (on['cpu_us_per_req'] / off['cpu_us_per_req'] - 1):+.1f}%)")
    if sync_runs:
        n = summarise(sync_runs, "POST", "ours-NORMAL", args.quiet_below)
        f = summarise(sync_runs, "POST", "ours-FULL", args.quiet_below)
        out.append("")
        out.append(f"== RECORDS_SYNCHRONOUS: POST /tests on ours, median of {args.rounds} rounds ==")
        out.append(header)
        out.append("-" * len(header))
        for label, m in (("NORMAL", n), ("FULL", f)):
            out.append(row("POST", label, m))
        pairs = pair_ratios(sync_runs, "POST", "ours-FULL", "ours-NORMAL")
        out.append(f"FULL/NORMAL: req/s {f['rps'] / n['rps']:.3f} (FULL serves {100 * (1 - f['rps'] / n['rps']):.1f}%"
                   f" fewer POSTs a second), p50 {f['p50_ms'] / n['p50_ms']:.2f}x, p99 {f['p99_ms'] / n['p99_ms']:.2f}x")
        out.append(f"      cross-checks: per-round ratios {pairs} (median {statistics.median(pairs):.3f}); CPU per "
                   f"request FULL {f['cpu_us_per_req']:.0f} us vs NORMAL {n['cpu_us_per_req']:.0f} us")
    out.append("")
    noisy = sum(r.result["cpu_other"] >= args.quiet_below for r in runs + sync_runs)
    if noisy:
        out.append(f"WARNING: {noisy} of {len(runs) + len(sync_runs)} runs had other processes using "
                   f">= {args.quiet_below:g} cores (see 'other' on each run line): req/s and ratios are not reliable.")
    out.append("CPU us/req: CPU time of the server's gunicorn processes per answered request (median of runs).")
    out.append("CPU-cost ratio: what the req/s ratio would be if both were limited only by CPU (server + wrk per "
               "request); less sensitive to other load than req/s.")
    out.append("other CPU: median cores used by processes other than our gunicorns and wrk during the runs "
               f"(noise on a shared machine; {os.cpu_count()} cores in all).")
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
    p.add_argument("--quiet-below", type=float, default=0.25, metavar="CORES",
                   help="before each measured run, wait until other processes use less than this many cores")
    p.add_argument("--quiet-wait", type=int, default=30, metavar="SECONDS",
                   help="longest wait for that before running anyway (0: never wait)")
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
    p.add_argument("--per-clinic", type=int, default=records_gen.RECORDS_PER_CLINIC,
                   help="records a clinic in the pre-fill (1,000 clinics: the Lua scripts pick among them)")
    p.add_argument("--tmpdir", default=None, help="where the temporary database and server logs go")
    p.add_argument("--keep-tmp", action="store_true", help="keep the database and server logs")
    p.add_argument("--profile", action="store_true",
                   help="after measuring, load each app once more per scenario under py-spy (needs "
                        "`.venv/bin/pip install py-spy`) and print the top functions")
    p.add_argument("--profile-top", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--ours-app", default=None, metavar="MODULE:CALLABLE",
                   help="run this app as ours instead of gunicorn.conf.py's wsgi_app (to try a change to the "
                        "service without editing it; MODULE is looked up in bench/ and the repository)")
    p.add_argument("--json", default=None, help="write raw runs here (default bench/results/core-<time>.json)")
    p.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    args = parse_load_arguments(p, argv)
    args.scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenarios or set(args.scenarios) - set(SCRIPTS):
        p.error("--scenarios takes GET and/or POST")
    args.clinics = records_gen.CLINICS
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
        ours = Server("ours", gunicorn_argv(ours_port, args.workers, args.ours_app), ours_env, tmp / "ours.log",
                      ours_port)
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
            auth = start_with_auth(db_path, args.workers, args.ours_app, ours_env, tmp)
            servers.append(auth)
            compared.append(auth)
        for scenario in args.scenarios:
            log(f"\n{scenario} /tests: warm-up {args.warmup:g}s each, then {args.rounds} rounds")
            measure(wrk, scenario, compared, args, runs, all_servers=servers)
        if args.auth_compare:
            auth.stop()

        if args.synchronous_compare:
            bare.stop()
            full_port = free_port()
            full = Server("ours-FULL", gunicorn_argv(full_port, args.workers, args.ours_app),
                          {**ours_env, "RECORDS_SYNCHRONOUS": "FULL"}, tmp / "ours-full.log", full_port)
            servers.append(full)
            full.start()
            ours.name = "ours-NORMAL"
            log(f"\nRECORDS_SYNCHRONOUS NORMAL vs FULL, POST /tests: warm-up {args.warmup:g}s each, "
                f"then {args.rounds} rounds")
            measure(wrk, "POST", [ours, full], args, sync_runs, all_servers=servers)
            ours.name = "ours"
            full.stop()

        text, all_pass = report(runs, args.scenarios, sync_runs, args, sizes, settings)
        log(text)

        if args.profile:
            if args.synchronous_compare:  # the bare app was stopped for the synchronous part
                bare.start()
            if args.auth_compare:  # stopped after its rounds, to leave the machine to the others
                auth.start()
            for scenario in args.scenarios:
                for server in compared:
                    profile(wrk, scenario, server, args, tmp)

        json_path = Path(args.json) if args.json else BENCH_DIR / "results" / (
            "core-" + datetime.now().strftime("%Y%m%d-%H%M%S") + f"-w{args.workers}.json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({
            "command": [sys.executable, *sys.argv], "args": {k: v for k, v in vars(args).items()},
            "body_bytes": {"POST": sizes[0], "GET": sizes[1]},
            "runs": [{"scenario": r.scenario, "app": r.app, "round": r.round, **r.result} for r in runs + sync_runs],
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
