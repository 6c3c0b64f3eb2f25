"""Throughput of ResilientTask relative to a plain Celery task, measured in one run.

One redis-server and one prefork worker (``-c 2``) serve three task kinds: a plain
task, the same with ``acks_late=True`` (which ResilientTask sets: the message stays
unacked until the task has run, so the prefetch window holds running tasks too), and
ResilientTask. Each round runs the three, in an order that rotates from round to round
so drift hits all alike. A run publishes N tasks to a queue nobody consumes, then times
from ``add_consumer`` until all N have run (each task INCRs a counter). Prints tasks/s
per kind (median over rounds), the median per-round ratio of ResilientTask to the
acks_late plain task (what the class itself costs) and, last, the median per-round
ratio resilient/plain (goal: >= 0.98).

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

from benchmarks._bench import environment, nodename  # noqa: E402
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
            for task in KINDS:  # fork, connect, import
                one_round(app, server, worker, task, 200, "warmup")
            rates: dict[str, list[float]] = {task: [] for task in KINDS}
            for r in range(opts.rounds):
                order = list(KINDS)[r % len(KINDS) :] + list(KINDS)[: r % len(KINDS)]
                for task in order:
                    rates[task].append(one_round(app, server, worker, task, opts.tasks, f"k{r}"))
        print(environment(server.client()))
    for task, label in KINDS.items():
        print(f"{label:<26}: {statistics.median(rates[task]):6.0f} tasks/s  (rounds: "
              f"{', '.join(f'{x:.0f}' for x in rates[task])})")  # fmt: skip
    # The runs of one round share the machine's state; their ratios cancel slow drift.
    late = ratio(rates, "bench.resilient", "bench.plain_late")
    print(f"ratio resilient/plain acks_late = {late:.3f} (median of {opts.rounds} rounds)")
    paired = ratio(rates, "bench.resilient", "bench.plain")
    print(f"ratio resilient/plain = {paired:.3f} (median of {opts.rounds} rounds)")


KINDS = {
    "bench.plain": "plain Celery task",
    "bench.plain_late": "plain task, acks_late=True",
    "bench.resilient": "ResilientTask",
}


def ratio(rates: dict[str, list[float]], top: str, bottom: str) -> float:
    return float(statistics.median(t / b for t, b in zip(rates[top], rates[bottom])))


if __name__ == "__main__":
    main()
