"""What a batch over the record limit costs before its 413: seconds, and the anonymous memory
of the worker that refuses it (sampled from /proc/PID/smaps_rollup while it works), then how
long /health waits while four such batches arrive at once at the same worker(s).

    .venv/bin/python bench/bench_batch_limits.py [--mib 16] [--workers 1]

The bodies: `{}` lines (NDJSON) and an array of `{}` (JSON), each just under the byte limit,
so only the record limit (10,000) refuses them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.live import AnonPeak, Server, request  # noqa: E402


def bodies(size: int) -> dict[str, tuple[str, bytes]]:
    return {"ndjson {} lines": ("application/x-ndjson", b"{}\n" * (size // 3)),
            "json array of {}": ("application/json", b"[" + b"{}," * (size // 3 - 1) + b"{}]")}


def one(server: Server, worker: int, content_type: str, body: bytes) -> None:
    with AnonPeak(worker) as memory:
        started = time.perf_counter()
        resp = server.request("POST", "/tests/_batch", body, {"Content-Type": content_type}, timeout=300)
        seconds = time.perf_counter() - started
    alive = Path(f"/proc/{worker}").exists()
    print(f"  status {resp.status}{'' if alive else ' (worker died)'}  {seconds:6.2f} s  worker anon before"
          f" {memory.base / 1024:6.1f} MiB, peak {memory.peak / 1024:7.1f} MiB (+{memory.growth_mib:.1f} MiB)")


def health_under_four(server: Server, content_type: str, body: bytes) -> None:
    worst = 0.0
    with ThreadPoolExecutor(4) as pool:
        posts = [pool.submit(server.request, "POST", "/tests/_batch", body, {"Content-Type": content_type}, 300)
                 for _ in range(4)]
        while not all(p.done() for p in posts):
            started = time.perf_counter()
            request(server.port, "GET", "/health", timeout=300)
            worst = max(worst, time.perf_counter() - started)
        statuses = [p.result().status for p in posts]
    print(f"  four at once: {statuses}, slowest /health {worst:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=16, help="body size in MiB (default 16, the default limit)")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers of the server the four batches and /health share (default 1: its threads)")
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        workers = Server(Path(tmp) / "one.db", Path(tmp) / "one.log", workers=1,
                         env={"RECORDS_MAX_BATCH_BYTES": str(size)}).start()
        try:
            for name, (content_type, body) in bodies(size).items():
                print(f"{name}: {len(body):,} bytes, 1 worker")
                one(workers, workers.worker_pids()[0], content_type, body)
        finally:
            workers.kill()
        shared = Server(Path(tmp) / "shared.db", Path(tmp) / "shared.log", workers=args.workers,
                        env={"RECORDS_MAX_BATCH_BYTES": str(size)}).start()
        try:
            for name, (content_type, body) in bodies(size).items():
                print(f"{name}, {args.workers} worker(s):")
                health_under_four(shared, content_type, body)
        finally:
            shared.kill()


if __name__ == "__main__":
    main()
