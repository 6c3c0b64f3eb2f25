"""Seed 002 before/after: ``python -m examples.priorities.scenario``.

Starts its own redis-server and, for plain Celery and then for celery-resilience: a
prefork worker reserves 20 low (priority 9) and 5 medium (priority 3) countdown tasks and
is stopped (SIGTERM, as when workers are recycled); 5 urgent tasks (priority 0) are
published; once the countdowns are due a fresh worker runs all 30. Prints where the
restored tasks were put and at which positions the urgent tasks ran.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

from tests.bench.redis_server import RedisServer
from tests.bench.workers import PreforkWorker

from .app import LOW, MEDIUM, RAN, URGENT, create_app, priority_key

REPO = str(Path(__file__).resolve().parents[2])
COUNTDOWN = 10.0  # long enough to reserve and stop the first worker before any is due


@dataclasses.dataclass
class Outcome:
    lists: dict[str, int]  # where the restored tasks were put
    urgent_positions: list[int]  # where the 5 urgent tasks ran among all 30


def worker(server: RedisServer, plugin: bool, *args: str) -> PreforkWorker:
    env = {"PRIORITIES_BROKER_URL": server.url(0), "PRIORITIES_PLUGIN": str(int(plugin)),
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    return PreforkWorker("examples.priorities.worker", cwd=REPO, queues=["high"], env=env,
                         concurrency=1, extra_args=args)  # fmt: skip


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("the scenario stalled")
        time.sleep(0.05)


def run(server: RedisServer, plugin: bool) -> Outcome:
    client = server.client()
    client.flushall()
    app = create_app(server.url(0), plugin=plugin)
    with worker(server, plugin):
        due = time.time() + COUNTDOWN
        for i, pri in enumerate([LOW] * 20 + [MEDIUM] * 5):
            app.send_task("priorities.record", (f"p{pri}-{i}",), priority=pri, countdown=COUNTDOWN)
        wait_for(lambda: client.hlen("unacked") == 25)
    # Leaving the with block stopped it warm (SIGTERM): kombu put back what it reserved.
    lists = {f"high/{p}": client.llen(priority_key("high", p)) for p in (URGENT, MEDIUM, LOW)}
    for i in range(5):
        app.send_task("priorities.record", (f"urgent-{i}",), priority=URGENT)
    wait_for(lambda: time.time() > due + 1)
    with worker(server, plugin, "--prefetch-multiplier", "1"):
        wait_for(lambda: client.llen(RAN) == 30)
    ran = [label.decode() for label in client.lrange(RAN, 0, -1)]
    return Outcome(lists, [i for i, label in enumerate(ran) if label.startswith("urgent")])


def main() -> None:
    with RedisServer() as server:
        for plugin in (False, True):
            outcome = run(server, plugin)
            print("celery-resilience" if plugin else "plain Celery", outcome, flush=True)


if __name__ == "__main__":
    main()
