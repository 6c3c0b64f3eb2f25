"""The freezer in a real prefork worker: a held ETA backlog is frozen, and let go with it.

The latency it buys is a benchmark (benchmarks/urgent_latency.py: urgent tasks while
10 000 ETA tasks are restored, p99 against plain Celery's); here, what it does and that
nothing is lost while it does it. Nothing waits on a clock: the backlog's countdown
outlasts the test; the consumer stops (a warm shutdown, a Redis restart) and lets go.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.bench._proc import tail
from tests.bench.jobapp import wait_until
from tests.bench.redis_server import RedisServer
from tests.bench.workers import PreforkWorker
from tests.integration.test_redis_restarts import producer, worker_for

pytestmark = [pytest.mark.integration, pytest.mark.fault]
BACKLOG = 1500
FROZEN = re.compile(r"resilience: \d+ objects frozen, the collector need not walk them "
                    r"\((\d+) freezes, (\d+) ETA tasks held")  # fmt: skip
UNFROZE = "resilience: unfroze"


def freezes(log: str) -> int:
    """The freezes the worker last reported (0: none)."""
    reports = FROZEN.findall(log)
    return int(reports[-1][0]) if reports else 0


def publish_backlog(url: str) -> None:
    app = producer(url)
    with app.producer_or_acquire() as pub:
        for n in range(BACKLOG):
            app.send_task("job.item", args=[n], countdown=3000, producer=pub)


def all_held(worker: PreforkWorker, client: Any, received: int) -> bool:
    return bool(
        worker.log.count("] received") >= received
        and client.hlen("unacked") == BACKLOG
        and not client.llen("celery")
    )


@pytest.mark.parametrize("freeze", [True, False], ids=["freeze", "control-no-freeze"])
def test_a_held_eta_backlog_is_frozen_and_let_go_when_the_worker_stops(freeze: bool) -> None:
    # Only arrivals freeze here (no collection takes 10 s): the count is exact.
    env = {"JOB_GC_FREEZE": int(freeze), "JOB_GC_FREEZE_EVERY": 500, "JOB_GC_FREEZE_AFTER": 10}
    with RedisServer() as server:
        client = server.client()
        with worker_for(server.url(), plugin=True, **env) as worker:
            publish_backlog(server.url())
            held = wait_until(lambda: all_held(worker, client, BACKLOG), 60)
            if freeze:  # the check reports every 5 s
                wait_until(lambda: freezes(worker.log) == 3, 15)
            reported = freezes(worker.log)
            worker.stop()  # warm shutdown: the consumer stops, the backlog goes back
            log = worker.log
        queued, unacked = client.llen("celery"), client.hlen("unacked")
        ran = sum(int(v or 0) for v in client.mget([f"job:runs:{n}" for n in range(BACKLOG)]))
    print(f"\n  {'freeze' if freeze else 'no freeze'}: held={held} freezes={reported} "
          f"back in the queue={queued} unacked={unacked} runs={ran}")  # fmt: skip
    assert held and (queued, unacked, ran) == (BACKLOG, 0, 0), tail(log, 40)  # nothing lost
    if freeze:
        assert reported == 3, tail(log, 40)
        held_at_3 = [int(h) for k, h in FROZEN.findall(log) if k == "3"]
        assert held_at_3 and held_at_3[0] >= BACKLOG  # the whole backlog was in the timer
        assert "(the consumer stopped: the ETA tasks it held are dropped)" in log
    else:
        assert (reported, UNFROZE in log) == (0, False)


def test_a_worker_holding_1500_eta_tasks_takes_them_all_back_after_a_redis_restart() -> None:
    """The consumer drops what it holds when Redis restarts (Celery clears its timer), the
    reclaimer puts it back, the new consumer takes it in again, and freezes it again."""
    env = {"JOB_GC_FREEZE_EVERY": 500, "JOB_GC_FREEZE_AFTER": 10}
    with RedisServer() as server:
        client = server.client()
        with worker_for(server.url(), plugin=True, **env) as worker:
            publish_backlog(server.url())
            held = wait_until(lambda: all_held(worker, client, BACKLOG), 60)
            wait_until(lambda: freezes(worker.log) == 3, 15)
            first = freezes(worker.log)
            server.restart(down_for=1.0)
            let_go = wait_until(lambda: UNFROZE in worker.log, 30)
            back = wait_until(lambda: all_held(worker, client, 2 * BACKLOG), 60)
            wait_until(lambda: freezes(worker.log) == 6, 15)
            again = freezes(worker.log)
            log = worker.log
        ran = sum(int(v or 0) for v in client.mget([f"job:runs:{n}" for n in range(BACKLOG)]))
    print(f"\n  restart: held={held} freezes={first} let go={let_go} back={back} "
          f"freezes after={again} runs={ran}")  # fmt: skip
    assert held and back and ran == 0, tail(log, 40)
    assert (first, again, let_go) == (3, 6, True), tail(log, 40)
