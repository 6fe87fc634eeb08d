"""How long a normal request takes while clients send their requests a byte a second.

    .venv/bin/python bench/bench_slow_clients.py                  # every mode, 15 s each
    .venv/bin/python bench/bench_slow_clients.py --modes nginx --duration 5

Modes, each on a fresh gunicorn (`-c gunicorn.conf.py`, `--workers`, a temporary database):
- `no-deadline`: gunicorn alone with RECORDS_BODY_TIMEOUT_MS at one hour, i.e. the service
  before the body deadline existed;
- `deadline`: gunicorn alone with RECORDS_BODY_TIMEOUT_MS at `--body-timeout-ms`;
- `nginx`: Debian's nginx running deploy/nginx.conf in front of gunicorn (as tests/test_nginx.py
  runs it), the slow clients talking to nginx.

`--slow` clients (default: as many as gunicorn reads requests at once, workers x threads) send
a POST's headers at once and its body a byte a second; from the moment they have all started,
a GET of one record is timed every 0.5 s for `--duration` seconds, each with a 30 s client
timeout. Prints, per mode, how many GETs were answered, the first one's time, and the median
and longest time of those answered.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.live import Nginx, Server, SlowClients, request  # noqa: E402  (the tests' own real-process helpers)

RECORD = {"test_id": "probe", "clinic_id": "C001", "patient_id": "P1", "test_type": "CBC", "result": 7.2,
          "collected_at": "2025-05-01T10:00:00Z"}
BODY = json.dumps({**RECORD, "test_id": "slow"}).encode()
HEAD = (f"POST /tests HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {len(BODY)}"
        "\r\n\r\n").encode()


def timed_gets(port: int, duration: float) -> list[float | None]:
    """Seconds each GET took (None: no answer within 30 s)."""
    times: list[float | None] = []
    end = time.monotonic() + duration
    while time.monotonic() < end:
        started = time.monotonic()
        try:
            ok = request(port, "GET", "/tests/probe", timeout=30).status == 200
        except OSError:
            ok = False
        times.append(time.monotonic() - started if ok else None)
        time.sleep(0.5)
    return times


def ms(seconds: float | None) -> str:
    return "no answer" if seconds is None else f"{seconds * 1000:.1f} ms"


def run_mode(mode: str, args: argparse.Namespace, tmp: Path) -> None:
    body_timeout_ms = 3_600_000 if mode == "no-deadline" else args.body_timeout_ms
    server = Server(db_path=tmp / f"{mode}.db", log_path=tmp / f"{mode}.log", workers=args.workers,
                    env={"RECORDS_BODY_TIMEOUT_MS": str(body_timeout_ms), "RECORDS_LOG_LEVEL": "WARNING"}).start()
    proxy = None
    try:
        assert server.request("POST", "/tests", RECORD).status == 201
        port = server.port
        if mode == "nginx":
            proxy = Nginx(tmp / "nginx", [f"127.0.0.1:{server.port}"]).start()
            port = proxy.port
        slow = args.slow or server.request_slots()
        with SlowClients(port, HEAD, BODY, count=slow):
            times = timed_gets(port, args.duration)
        answered = [t for t in times if t is not None]
        print(f"{mode:<12} slow clients {slow:>3}  GETs answered {len(answered):>3}/{len(times):<3} "
              f"first {ms(times[0]):>10}  median {ms(statistics.median(answered) if answered else None):>10}  "
              f"longest {ms(max(answered) if answered else None):>10}", flush=True)
    finally:
        if proxy:
            proxy.stop()
        server.kill()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=("no-deadline", "deadline", "nginx"),
                   default=["no-deadline", "deadline", "nginx"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--slow", type=int, default=0, help="slow clients (default: workers x threads)")
    p.add_argument("--duration", type=float, default=15)
    p.add_argument("--body-timeout-ms", type=int, default=10_000)
    args = p.parse_args(argv)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-slow-") as tmp:
        for mode in args.modes:
            run_mode(mode, args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
