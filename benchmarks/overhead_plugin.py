"""Throughput of a prefork worker with the plugin relative to plain Celery, in one run.

Two workers of the same configuration (prefork ``-c 2``, prefetch 4, the one-INCR task
of ``benchmarks/overhead_app``) on one redis-server:

- *plugin*: ``install(app)`` (keepalive and heal, routing, the atomic fetch and its
  reclaimer) and ``bench.resilient``, a ResilientTask; its messages come from a producer
  app that called ``install()`` (the plugin's transport: the origin stamp);
- *plain*: the same app without ``install()`` and ``bench.plain``, a plain Task.

Both stay up; between its rounds each consumes only an empty queue. Rounds come in pairs
(plain then plugin, then plugin then plain, ...) so load drift hits both alike. A round
publishes N tasks to the arm's queue, then times its worker from ``add_consumer`` until
all N have run (``overhead.one_round``). Prints each arm's tasks/s (median), the CPU the
idle worker used meanwhile, and, last, the median of the per-pair ratios plugin/plain
(goal: >= 0.98).

    python benchmarks/overhead_plugin.py [--tasks 1000] [--pairs 15] [--no-fetch]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from celery import Celery  # noqa: E402

from benchmarks._bench import environment  # noqa: E402
from benchmarks.overhead import one_round  # noqa: E402
from celery_resilience import install  # noqa: E402
from tests.bench.redis_server import RedisServer  # noqa: E402
from tests.bench.workers import PreforkWorker  # noqa: E402

TASKS = {"plain": "bench.plain", "plugin": "bench.resilient"}


def worker(server: RedisServer, arm: str, fetch: bool) -> PreforkWorker:
    env = {"BENCH_BROKER_URL": server.url(0), "BENCH_PLUGIN": str(int(arm == "plugin")),
           "BENCH_FETCH": str(int(fetch)), "PYTHONPATH": str(REPO)}  # fmt: skip
    return PreforkWorker("benchmarks.overhead_app", concurrency=2, env=env, cwd=str(REPO),
                         queues=["idle"])  # fmt: skip


def cpu_seconds(worker: PreforkWorker) -> float:
    """User + system CPU seconds used so far by the worker's processes."""
    ticks = 0
    for pid in worker.group_pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def timed_round(producers: dict[str, Celery], server: RedisServer,
                workers: dict[str, PreforkWorker], arm: str, n: int,
                key: str) -> tuple[float, float]:  # fmt: skip
    """``arm``'s tasks/s, and the share of a core the other (idle) worker used meanwhile."""
    (idle,) = (w for name, w in workers.items() if name != arm)
    cpu, start = cpu_seconds(idle), time.perf_counter()
    rate = one_round(producers[arm], server, workers[arm], TASKS[arm], n, key)
    return rate, (cpu_seconds(idle) - cpu) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--no-fetch", action="store_true",
                        help="the plugin arm without the atomic fetch (resilience_fetch=False)")  # fmt: skip
    opts = parser.parse_args()
    rates: dict[str, list[float]] = {arm: [] for arm in TASKS}
    bystander: dict[str, list[float]] = {arm: [] for arm in TASKS}  # idle while the other ran
    with RedisServer() as server:
        print(environment(server.client()))
        producers = {arm: Celery(f"producer-{arm}", broker=server.url(0), set_as_current=False)
                     for arm in TASKS}  # fmt: skip
        install(producers["plugin"], keepalive=False)  # the stamp, not this process's sockets
        workers = {arm: worker(server, arm, not opts.no_fetch) for arm in TASKS}
        with workers["plain"], workers["plugin"]:
            for arm in TASKS:  # fork the children, connect, import
                one_round(producers[arm], server, workers[arm], TASKS[arm], 200, "warmup")
            for p in range(opts.pairs):
                for arm in list(TASKS)[:: 1 if p % 2 == 0 else -1]:
                    rate, idle_cpu = timed_round(producers, server, workers, arm, opts.tasks,
                                                 f"k{p}")  # fmt: skip
                    rates[arm].append(rate)
                    bystander[next(a for a in TASKS if a != arm)].append(idle_cpu)
    for arm, label in (
        ("plain", "plain Celery, no install()"),
        ("plugin", "install() + ResilientTask" + (" (fetch off)" if opts.no_fetch else "")),
    ):
        print(f"{label:<39}: {statistics.median(rates[arm]):6.0f} tasks/s  (rounds: "
              f"{', '.join(f'{x:.0f}' for x in rates[arm])})")  # fmt: skip
    print(f"idle worker's CPU during the other's rounds: plugin {_pct(bystander['plugin'])}, "
          f"plain {_pct(bystander['plain'])} of a core")  # fmt: skip
    paired = statistics.median(g / p for p, g in zip(rates["plain"], rates["plugin"]))
    print(f"ratio plugin/plain = {paired:.3f} (median of {opts.pairs} paired rounds)")


def _pct(shares: list[float]) -> str:
    return f"{statistics.mean(shares) * 100:.1f}%"


if __name__ == "__main__":
    main()
