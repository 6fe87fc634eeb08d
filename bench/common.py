"""What every benchmark here shares, in one place: wrk (installed when missing, run with one of
our Lua scripts, its BENCH_RESULT line parsed), gunicorn servers on free loopback ports, the
pre-filled database, waiting for a shared machine to go quiet, CPU snapshots of every run,
alternating rounds and their medians, the load options, py-spy summaries, and the run skeleton
that stops every server it started, on errors, Ctrl-C and SIGTERM too.

Scripts import it as `common` (bench/ is sys.path[0] when one of them runs); importing it also
puts the repository on sys.path, so `records_service` imports without being installed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import records_gen  # noqa: E402  (bench/ is on sys.path: this file's own folder)

VENV_BIN = Path(sys.executable).parent
GUNICORN = str(VENV_BIN / "gunicorn") if (VENV_BIN / "gunicorn").exists() else "gunicorn"


class BenchError(RuntimeError):
    pass


def write_alone(db, work):
    """`work` in a transaction of its own, as `Database.write` did before group commit (bench only)."""
    with db.transaction() as conn:
        return work(conn)


def log(msg: str = "") -> None:
    print(msg, flush=True)


def log_command() -> None:
    """The command line of this run, first in every benchmark's output."""
    log("command: " + shlex.join([os.path.relpath(sys.executable, Path.cwd()), *sys.argv]))


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


def clean_env() -> dict[str, str]:
    """This process's environment without RECORDS_* and BENCH_*: what each server's own
    settings are added to, so nothing from the caller's shell changes a server."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RECORDS_", "BENCH_"))}


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


def fs_type(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def describe_machine(wrk: str, settings: dict[str, str], workers: int) -> None:
    """Log what the figures were measured on: CPUs, load, versions, the gunicorn settings every
    server of the run shares."""
    import falcon
    import gunicorn
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    log(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"Python {platform.python_version()}, falcon {falcon.__version__}, gunicorn {gunicorn.__version__}, "
        f"{' '.join(wrk_version)[:40]}")
    log(f"gunicorn (every server, -c gunicorn.conf.py): worker_class={settings.get('worker_class')} "
        f"workers={workers} timeout={settings.get('timeout')} graceful_timeout={settings.get('graceful_timeout')} "
        f"keepalive={settings.get('keepalive')} backlog={settings.get('backlog')}")


# -- CPU -------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSnapshot:
    busy: int  # machine-wide jiffies, idle/iowait/steal excluded
    steal: int
    servers: int  # jiffies of every process in our gunicorn sessions (masters and workers)
    servers_sys: int  # of which in the kernel
    children: float  # seconds of reaped children of this process (wrk)
    wall: float


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after the command) of every live process:
    [1] is the parent's pid, [3] the session id, [11] and [12] user and system ticks."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        yield int(entry), stat[stat.rfind(")") + 2:].split()


def cpu_snapshot(server_sids: set[int]) -> CpuSnapshot:
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    servers = servers_sys = 0
    for _, rest in process_stats():
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


# -- pre-fill ----------------------------------------------------------------------------------

def make_database(path: Path, page_size: int | None) -> None:
    """An empty WAL database file with `page_size` bytes a page, which the service then migrates
    and keeps (a page size is fixed once a file is in WAL mode); None leaves the file to the
    service, which makes it with its own page size."""
    if page_size is None:
        return
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"PRAGMA page_size = {int(page_size)}")
        conn.execute("PRAGMA journal_mode = WAL")  # writes the header: the page size is now the file's
        if conn.execute("PRAGMA page_size").fetchone()[0] != page_size:
            raise BenchError(f"{path} was not made with {page_size}-byte pages (does it exist already?)")
    finally:
        conn.close()


def add_page_size_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--page-size", type=int, default=None, metavar="BYTES",
                   help="make our database with this page size (default: the service's own)")


def prefill(db_path: Path, clinics: int, per_clinic: int, page_size: int | None = None) -> float:
    """Store clinics*per_clinic records (records_gen.prefill_records) through Store.insert, as the
    service stores them, in a database made with `page_size`; return the seconds it took."""
    from records_service.store.sqlite import SQLiteStore as Store
    from records_service.validate import validate_record

    make_database(db_path, page_size)
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
        # Own session: a Ctrl-C in the terminal reaches us, and we stop gunicorn in order. The
        # session id (the master's pid) is also how cpu_snapshot finds the server's processes.
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
    # Every app: the same config file, so every gunicorn setting is the same; only the app differs.
    # `app` None: gunicorn.conf.py's wsgi_app (our service); otherwise MODULE:CALLABLE, looked up
    # in bench/ and the repository.
    argv = [GUNICORN, "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}", "-w", str(workers), "--no-control-socket"]
    if app:
        argv += ["--pythonpath", str(BENCH_DIR), app]
    return argv


def run_guarded(servers: list[Server], work: Callable[[], int]) -> int:
    """Run a benchmark's `work`: a BenchError is reported (exit 2), Ctrl-C exits 130, and every
    server in `servers` (filled as `work` starts them) is stopped at the end, SIGTERM included."""

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return work()
    except BenchError as exc:
        log(f"\nbenchmark failed: {exc}")
        return 2
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    finally:
        stop_all(servers)


def run_benchmark(args: argparse.Namespace, prefix: str, work: Callable[[str, Path, list[Server]], int],
                  keep_tmp: bool = False) -> int:
    """The frame of every benchmark's main(): log the command line, install wrk when missing,
    make a temporary directory (in args.tmpdir when given), and run `work(wrk, tmp, servers)`
    under run_guarded; `servers` is the list it stops at the end. The directory is removed
    afterwards, unless `keep_tmp`."""
    log_command()
    wrk = ensure_wrk()
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=getattr(args, "tmpdir", None)))
    servers: list[Server] = []
    try:
        return run_guarded(servers, lambda: work(wrk, tmp, servers))
    finally:
        if keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def server_settings(args: argparse.Namespace, wrk: str, env: dict, tmp: Path) -> dict[str, str]:
    """gunicorn's settings for the servers' `env`; --workers (args.workers None) becomes the
    config's count. Logs the machine, those settings and where `tmp` is."""
    settings = gunicorn_config(env)
    if args.workers is None:
        args.workers = int(settings["workers"])
    describe_machine(wrk, settings, args.workers)
    log(f"temp dir: {tmp} ({fs_type(tmp)}); server output in {tmp}/*.log")
    return settings


# -- load ------------------------------------------------------------------------------------

def run_wrk(wrk: str, script: Path, url: str, *, threads: int, connections: int, duration: float, timeout: int,
            script_args: Iterable[str] = ()) -> tuple[dict, str]:
    """One wrk run with a script of ours; its BENCH_RESULT line (see common.lua), and wrk's output.

    The script's first argument is a fresh 8-hex-digit nonce, so ids it makes never repeat across
    runs. wrk inherits this process's environment (BENCH_AUTHORIZATION: see common.lua).
    """
    cmd = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--timeout", f"{timeout}s",
           "--latency", "-s", str(script), url, "--", secrets.token_hex(4), *script_args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    match = re.search(r"^BENCH_RESULT (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not match:
        raise BenchError(f"wrk failed ({out.returncode}): {shlex.join(cmd)}\n{out.stdout}{out.stderr}")
    result = json.loads(match.group(1))
    result["socket_errors"] = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return result, out.stdout


def wrk_once(wrk: str, script: Path, url: str, args: argparse.Namespace, duration: float,
             script_args: Sequence[str] = (), connections: int | None = None) -> dict:
    """run_wrk with the load options (--threads, --connections, --timeout) of `args`."""
    return run_wrk(wrk, script, url, threads=args.threads, connections=connections or args.connections,
                   duration=duration, timeout=args.timeout, script_args=script_args)[0]


@dataclass
class Run:
    scenario: str
    app: str
    round: int
    result: dict
    wrk_output: str = field(repr=False, default="")


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


def measure(wrk: str, scenario: str, script: Path, servers: list[Server], args: argparse.Namespace,
            runs: list[Run], script_args: Callable[[Server], Sequence[str]] = lambda server: (),
            all_servers: Sequence[Server] | None = None, connections: int | None = None) -> None:
    """Warm each server up (--warmup s), then --rounds rounds of `script`, alternating which server
    goes first; each run waits for quiet, is CPU-snapshotted, logged and appended to `runs`.
    `script_args` gives the Lua script's arguments after the nonce, asked anew for every run.
    `all_servers` (default: `servers`) are every gunicorn of ours that may be running, idle or
    not: their CPU counts as the servers', not as other processes' (quiet wait, CPU snapshots).
    `connections` overrides --connections for this scenario."""
    for server in servers:
        wrk_once(wrk, script, server.url, args, args.warmup, script_args(server), connections)
    for rnd in range(1, args.rounds + 1):
        order = servers if rnd % 2 else list(reversed(servers))
        for server in order:
            sids = {s.proc.pid for s in (all_servers or servers) if s.proc}
            waited, _ = wait_for_quiet(args, sids) if args.quiet_wait > 0 else (0.0, 0.0)
            before = cpu_snapshot(sids)
            result, output = run_wrk(wrk, script, server.url, threads=args.threads,
                                     connections=connections or args.connections, duration=args.duration,
                                     timeout=args.timeout, script_args=script_args(server))
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


def pair_ratios(runs: list[Run], scenario: str, num: str, den: str) -> list[float]:
    """num/den req/s of the two runs of each round (run back to back, so under similar noise)."""
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if r.scenario == scenario:
            by_round.setdefault(r.round, {})[r.app] = r.result["rps"]
    return [round(v[num] / v[den], 3) for _, v in sorted(by_round.items()) if num in v and den in v and v[den]]


def noisy_warning(runs: list[Run], quiet_below: float) -> str | None:
    noisy = sum(r.result["cpu_other"] >= quiet_below for r in runs)
    if not noisy:
        return None
    return (f"WARNING: {noisy} of {len(runs)} runs had other processes using >= {quiet_below:g} cores "
            "(see 'other' on each run line): req/s and ratios are not reliable.")


def finish(report: str, results: dict, runs: list[Run], quiet_below: float, prefix: str) -> None:
    """Log the report and the noise warning, and write the results and every run as JSON to
    bench/results/PREFIX-<time>.json (git-ignored)."""
    log(report)
    warning = noisy_warning(runs, quiet_below)
    if warning:
        log(warning)
    out = BENCH_DIR / "results" / (f"{prefix}-" + datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": [sys.executable, *sys.argv], "results": results,
                               "runs": [{"scenario": r.scenario, "app": r.app, "round": r.round, **r.result}
                                        for r in runs]}, indent=1))
    log(f"\nraw results: {out}")


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


def add_with_sql_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--with-sql", default=None, metavar="SQL",
                   help="statements run on our database before measuring: a schema change to measure without "
                        "editing the service, e.g. an index under consideration")


def with_sql(db_path: Path, sql: str) -> None:
    """Run --with-sql's statements on the database at `db_path`."""
    started = time.perf_counter()
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.executescript(sql)
    finally:
        conn.close()
    log(f"--with-sql ran in {time.perf_counter() - started:.1f}s: {sql}")


def parse_load_arguments(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = p.parse_args(argv)
    if min(args.duration, args.warmup, args.timeout, args.rounds, args.connections, args.threads) < 1:
        p.error("--duration, --warmup, --timeout, --rounds, --connections and --threads must be at least 1")
    if args.quiet_wait < 0:
        p.error("--quiet-wait must be 0 or more")
    return args


# -- profile -----------------------------------------------------------------------------------

def py_spy_binary() -> str:
    binary = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if not binary:
        raise BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
    return binary


def py_spy(server: Server, seconds: int, raw: Path) -> subprocess.Popen:
    """Start py-spy sampling all of `server`'s processes for `seconds` into `raw` (collapsed
    stacks; 250 Hz, non-blocking, so the workers are not paused to be sampled)."""
    spy = subprocess.Popen([py_spy_binary(), "record", "--pid", str(server.proc.pid), "--subprocesses", "--nolineno",
                            "--format", "raw", "--rate", "250", "--nonblocking", "--duration", str(seconds),
                            "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1)  # let py-spy attach before the load starts
    return spy


def py_spy_done(spy: subprocess.Popen, raw: Path, timeout: float) -> None:
    _, err = spy.communicate(timeout=timeout)
    if spy.returncode != 0 or not raw.exists():
        raise BenchError(f"py-spy failed ({spy.returncode}): {err}")


# Frames every worker stack starts with (gunicorn boot and the worker loop): not informative.
_BOOT_FRAMES = re.compile(r"\((gunicorn/app/|gunicorn/arbiter\.py|gunicorn\)$)|^<module> |"
                          r"^SyncWorker\.(run|run_for_one|accept) |^Worker\.init_process ")


def _frame_file(frame: str) -> str:
    return frame[frame.rfind("(") + 1:].rstrip(")")


def _module_group(frame: str) -> str:
    path = _frame_file(frame)
    if path.startswith("records_service/"):
        return path if not path.startswith("records_service/store/") else f"{path} (incl. sqlite3 C calls)"
    for lib in ("falcon", "gunicorn"):
        if f"{lib}/" in path:
            return lib
    top = path.split("/", 1)[0]
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    return f"stdlib {top.removesuffix('.py')}"


def profile_summary(raw: Path, top: int = 20, focus: str | None = None) -> str:
    """Self time by module, then self and inclusive time per function, from py-spy's collapsed
    stacks (samples py-spy judged idle are not recorded). `focus`: a function whose inclusive
    share goes first."""
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


WAL_HEADER, WAL_FRAME_HEADER = 32, 24


def wal_frames_and_commits(wal: Path, page_size: int) -> tuple[int, int]:
    """Frames in a WAL file, and how many of them end a commit (a frame header's second word, the
    database size after the commit, is non-zero only there)."""
    frames = commits = 0
    with open(wal, "rb") as f:
        f.seek(WAL_HEADER)
        while len(header := f.read(WAL_FRAME_HEADER)) == WAL_FRAME_HEADER:
            frames += 1
            commits += struct.unpack(">II", header[:8])[1] != 0
            f.seek(page_size, os.SEEK_CUR)
    return frames, commits


def wal_page_owners(conn, path) -> list[str]:
    """The B-tree (table or index name, "page 1" or "free list") of each page in `path`'s WAL, one
    entry per frame, in the order written: what a write cost, object by object."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    wal = Path(f"{path}-wal").read_bytes()
    pages = [int.from_bytes(wal[at:at + 4], "big") for at in range(WAL_HEADER, len(wal), page_size + WAL_FRAME_HEADER)]
    owners = dict(conn.execute("SELECT pageno, name FROM dbstat"))
    return ["page 1" if page == 1 else owners.get(page, "free list") for page in pages]
