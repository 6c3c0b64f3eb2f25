"""Urgent-task latency while a worker holds, and a restart restores, a low-priority backlog.

Seed 002 at scale, on one redis-server and the priorities app (``benchmarks/urgent_app``:
queue ``high``, priority steps 0-9, 0 first). For plain Celery, then with the plugin:

1. ``--backlog`` low tasks (priority 9, a countdown that outlasts the run) are published;
   a prefork worker (``-c 2``) reserves them all and holds them (kombu's ``unacked``).
2. *held*: one urgent task (priority 0) every ``--interval`` seconds for ``--held`` s.
3. The worker restarts: SIGTERM (warm shutdown: kombu restores the backlog to the lists),
   then the same worker starts again. Nothing is published while no worker runs: the
   downtime is the same for both arms and is not what is measured.
4. *restored*: urgent tasks again, while the new worker takes the backlog back, and for
   ``--tail`` s after it has.

An urgent task's latency is from just before its publish to the start of its body (both
clocks are this machine's). The baseline is *idle*: the same urgent tasks, no backlog.
Prints p50/p99 per phase and, last, the plugin's p99 over both phases against its idle
p99 (goal: <= 2x), and plain Celery's. kombu <= 5.3 restores every message to the list
polled first (seed 002); run it under both kombu versions.

    python benchmarks/urgent_latency.py [--backlog 10000] [--interval 0.02] [--held 3]
        [--fetch-wait SECONDS] [--no-worker-gc]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis  # noqa: E402
from celery import Celery  # noqa: E402

from benchmarks._bench import environment, percentile, wait_until  # noqa: E402
from benchmarks.urgent_app import LATENCIES  # noqa: E402
from examples.priorities.app import LOW, URGENT, create_app, priority_key  # noqa: E402
from tests.bench.redis_server import RedisServer  # noqa: E402
from tests.bench.workers import PreforkWorker  # noqa: E402

QUEUE = "high"
LOW_COUNTDOWN = 3000.0  # seconds: far beyond a run, below kombu's visibility timeout


def worker(server: RedisServer, plugin: bool, opts: argparse.Namespace) -> PreforkWorker:
    env = {"URGENT_BROKER_URL": server.url(0), "URGENT_PLUGIN": str(int(plugin)),
           "URGENT_GC_OFF": str(int(opts.no_worker_gc)), "PYTHONPATH": str(REPO)}  # fmt: skip
    if opts.fetch_wait is not None:
        env["URGENT_FETCH_WAIT"] = str(opts.fetch_wait)
    return PreforkWorker("benchmarks.urgent_app", concurrency=2, queues=[QUEUE], env=env,
                         cwd=str(REPO))  # fmt: skip


def waiting(client: redis.Redis) -> dict[str, int]:
    """Messages waiting in each non-empty priority list ({"high": n, "high/9": m})."""
    with client.pipeline(transaction=False) as pipe:
        for step in range(10):
            pipe.llen(priority_key(QUEUE, step))
        lengths = pipe.execute()
    return {f"{QUEUE}/{step}" if step else QUEUE: n for step, n in enumerate(lengths) if n}


def publish_backlog(app: Celery, n: int) -> None:
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            app.send_task("bench.low", priority=LOW, countdown=LOW_COUNTDOWN, producer=producer)


def publish_urgent(app: Celery, interval: float, done: Callable[[], bool]) -> int:
    """One urgent task every ``interval`` s until ``done()``; returns how many were sent."""
    sent = 0
    with app.producer_or_acquire() as producer:
        while not done():
            app.send_task("bench.urgent", (time.time(),), priority=URGENT, producer=producer)
            sent += 1
            time.sleep(interval)
    return sent


def collect(client: redis.Redis, count: int) -> list[float]:
    """The latencies of the ``count`` urgent tasks sent, once all have started."""
    wait_until(lambda: client.llen(LATENCIES) >= count, f"{count} urgent tasks to start")
    latencies = [float(x) for x in client.lrange(LATENCIES, 0, -1)]
    client.delete(LATENCIES)
    return latencies


def for_seconds(seconds: float) -> Callable[[], bool]:
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() > deadline


def idle_run(server: RedisServer, plugin: bool, opts: argparse.Namespace) -> list[float]:
    client = server.client()
    client.flushall()
    app = create_app(server.url(0), plugin=plugin)
    with worker(server, plugin, opts):
        sent = publish_urgent(app, opts.interval, for_seconds(opts.idle))
        return collect(client, sent)


def backlog_run(
    server: RedisServer, plugin: bool, opts: argparse.Namespace
) -> dict[str, list[float]]:
    """Urgent latencies while the backlog is held, then after the restart restored it."""
    client = server.client()
    client.flushall()
    app = create_app(server.url(0), plugin=plugin)
    publish_backlog(app, opts.backlog)
    held_by_worker = lambda: client.hlen("unacked") >= opts.backlog  # noqa: E731
    phases = {}
    with worker(server, plugin, opts) as w:
        wait_until(lambda: held_by_worker() and not waiting(client), "the backlog reserved")
        sent = publish_urgent(app, opts.interval, for_seconds(opts.held))
        phases["held"] = collect(client, sent)
        w.stop()  # SIGTERM: a warm shutdown restores what the worker held
        print(f"  restored by the warm shutdown to: {waiting(client)}", flush=True)
        w.start()
        drained = lambda: held_by_worker() and not waiting(client)  # noqa: E731
        sent = publish_urgent(app, opts.interval, then_for(drained, opts.tail))
        phases["restored"] = collect(client, sent)
        for entry in w.log.splitlines():  # the plugin's freezer, if it acted
            if "objects frozen" in entry or "unfroze" in entry:
                print("    worker:", entry.split("] ", 1)[-1], flush=True)
        w.kill()  # nothing more to measure: skip restoring the backlog again
    return phases


def then_for(condition: Callable[[], bool], seconds: float) -> Callable[[], bool]:
    """True ``seconds`` after ``condition()`` first held."""
    since: list[float] = []

    def done() -> bool:
        if not since and condition():
            since.append(time.monotonic())
        return bool(since) and time.monotonic() - since[0] > seconds

    return done


def line(label: str, latencies: list[float]) -> str:
    p50, p99 = (percentile(latencies, q) * 1000 for q in (50, 99))
    slow = sum(1 for x in latencies if x > 0.05)
    return (f"  {label:<34} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  max "
            f"{max(latencies) * 1000:7.1f} ms  n={len(latencies)}, {slow} over 50 ms")  # fmt: skip


def measure(server: RedisServer, plugin: bool, opts: argparse.Namespace) -> dict[str, float]:
    """Print one arm's phases; return its idle and backlog (held + restored) p99 in ms."""
    name = "celery-resilience" if plugin else "plain Celery"
    idle = idle_run(server, plugin, opts)
    print(line(f"{name}, idle", idle), flush=True)
    phases = backlog_run(server, plugin, opts)
    for phase, latencies in phases.items():
        print(line(f"{name}, {phase}", latencies), flush=True)
    both = phases["held"] + phases["restored"]
    print(line(f"{name}, held + restored", both), flush=True)
    return {"idle": percentile(idle, 99) * 1000, "backlog": percentile(both, 99) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between urgent")
    parser.add_argument("--held", type=float, default=3.0, help="seconds of the held phase")
    parser.add_argument("--tail", type=float, default=2.0, help="seconds after the backlog")
    parser.add_argument("--idle", type=float, default=6.0, help="seconds of the idle run")
    parser.add_argument("--fetch-wait", type=float, help="resilience_fetch_wait (default 0.2)")
    parser.add_argument("--no-worker-gc", action="store_true",
                        help="diagnostic: automatic GC off in the workers")  # fmt: skip
    opts = parser.parse_args()
    with RedisServer() as server:
        print(environment(server.client()))
        print(f"{opts.backlog} low-priority countdown tasks; an urgent task every "
              f"{opts.interval * 1000:.0f} ms", flush=True)  # fmt: skip
        # Plain Celery first: install() is process-wide, the plain producer must not see it.
        plain = measure(server, False, opts)
        plugin = measure(server, True, opts)
    print(f"urgent p99 under the backlog: celery-resilience {plugin['backlog']:.1f} ms = "
          f"{plugin['backlog'] / plugin['idle']:.2f}x its idle p99 {plugin['idle']:.1f} ms "
          f"(goal <= 2x); plain Celery {plain['backlog']:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
