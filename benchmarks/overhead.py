"""Throughput of ResilientTask relative to a plain Celery task, measured in one run.

One redis-server and one prefork worker (``-c 2``) serve both task kinds; rounds
alternate (plain, resilient, plain, ...) so drift hits both alike. Each round publishes
N tasks to a queue nobody consumes, then times from ``add_consumer`` until all N have
run (each task INCRs a counter). Prints tasks/s per kind (median over rounds) and, last,
the median of the per-pair ratios resilient/plain (goal: >= 0.98).

    python benchmarks/overhead.py [--tasks 3000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._bench import nodename  # noqa: E402
from tests.bench.redis_server import RedisServer  # noqa: E402
from tests.bench.workers import PreforkWorker  # noqa: E402


def one_round(
    app: Any, server: RedisServer, worker: PreforkWorker, task: str, n: int, key: str
) -> float:
    """``worker``'s throughput for ``n`` queued ``task`` messages: consume start to last INCR.

    The queue is filled before the worker consumes it, so publishing does not compete
    with the worker for the machine's cores.
    """
    client = server.client()
    client.delete(key)
    queue = task.replace(".", "-")
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            app.send_task(task, args=(key,), queue=queue, producer=producer)
    # Named destination: without one, a broadcast with reply=True waits out its timeout.
    destination = [nodename(worker)]
    start = time.perf_counter()
    app.control.add_consumer(queue, reply=True, timeout=10, destination=destination)
    while int(client.get(key) or 0) < n:
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    app.control.cancel_consumer(queue, reply=True, timeout=10, destination=destination)
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    opts = parser.parse_args()
    with RedisServer() as server:
        os.environ["BENCH_BROKER_URL"] = server.url(0)
        from benchmarks.overhead_app import app

        env = {"BENCH_BROKER_URL": server.url(0), "PYTHONPATH": str(REPO)}
        worker = PreforkWorker("benchmarks.overhead_app", concurrency=2, env=env, cwd=str(REPO),
                               queues=["idle"])  # fmt: skip
        with worker:
            one_round(app, server, worker, "bench.plain", 200, "warmup")  # fork, connect
            one_round(app, server, worker, "bench.resilient", 200, "warmup")
            rates: dict[str, list[float]] = {"bench.plain": [], "bench.resilient": []}
            for r in range(opts.rounds):
                for task in rates:
                    rates[task].append(one_round(app, server, worker, task, opts.tasks, f"k{r}"))
    plain = statistics.median(rates["bench.plain"])
    resilient = statistics.median(rates["bench.resilient"])
    # Adjacent rounds share the machine's state; their ratios cancel slow drift.
    paired = statistics.median(
        r / p for p, r in zip(rates["bench.plain"], rates["bench.resilient"])
    )
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(f"plain Celery task : {plain:8.0f} tasks/s  (rounds: "
          f"{', '.join(f'{x:.0f}' for x in rates['bench.plain'])})")  # fmt: skip
    print(f"ResilientTask     : {resilient:8.0f} tasks/s  (rounds: "
          f"{', '.join(f'{x:.0f}' for x in rates['bench.resilient'])})")  # fmt: skip
    print(f"ratio resilient/plain = {paired:.3f} (median of {opts.rounds} paired rounds)")


if __name__ == "__main__":
    main()
