"""The freezer in a real prefork worker: a held ETA backlog is frozen, and let go with it.

The latency it buys is a benchmark (benchmarks/urgent_latency.py: urgent tasks while
10 000 ETA tasks are restored, p99 against plain Celery's); here, what it does and that
nothing is lost while it does it. Nothing waits on a clock: the backlog's countdown
outlasts the test, and the consumer drops what it holds when Redis restarts (Celery
clears its timer), then takes it all back.
"""

from __future__ import annotations

import re

import pytest

from tests.bench._proc import tail
from tests.bench.jobapp import wait_until
from tests.bench.redis_server import RedisServer
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


@pytest.mark.parametrize("freeze", [True, False], ids=["freeze", "control-no-freeze"])
def test_a_held_eta_backlog_is_frozen_and_let_go_when_the_consumer_drops_it(freeze: bool) -> None:
    # Only arrivals freeze here (no collection takes 10 s): the counts are exact.
    env = {"JOB_GC_FREEZE": int(freeze), "JOB_GC_FREEZE_EVERY": 500, "JOB_GC_FREEZE_AFTER": 10}
    with RedisServer() as server:
        client = server.client()
        app = producer(server.url())
        with worker_for(server.url(), plugin=True, **env) as worker:
            with app.producer_or_acquire() as pub:
                for n in range(BACKLOG):
                    app.send_task("job.item", args=[n], countdown=3000, producer=pub)

            def all_held(received: int) -> bool:
                return bool(
                    worker.log.count("] received") >= received
                    and client.hlen("unacked") == BACKLOG
                    and not client.llen("celery")
                )

            def reported(n: int) -> int:  # the check reports every 5 s
                wait_until(lambda: freezes(worker.log) == n, 15) if freeze else None
                return freezes(worker.log)

            held = wait_until(lambda: all_held(BACKLOG), 60)
            first = reported(3)
            server.restart(down_for=1.0)  # the consumer closes: its timer is cleared
            let_go = wait_until(lambda: UNFROZE in worker.log, 30) if freeze else False
            back = wait_until(lambda: all_held(2 * BACKLOG), 60)  # taken in once more
            again = reported(6)
            log = worker.log
        ran = sum(int(v or 0) for v in client.mget([f"job:runs:{n}" for n in range(BACKLOG)]))
    print(f"\n  {'freeze' if freeze else 'no freeze'}: held={held} freezes={first} "
          f"let go={let_go} back={back} freezes after={again} runs={ran}")  # fmt: skip
    assert held and back and ran == 0, tail(log, 40)  # all held twice, none lost or run
    if freeze:
        assert (first, again) == (3, 6), tail(log, 40)
        assert let_go and "(the consumer stopped: the ETA tasks it held are dropped)" in log
        held_at_3 = [int(h) for k, h in FROZEN.findall(log) if k == "3"]
        assert held_at_3 and held_at_3[0] >= BACKLOG  # the whole backlog was in the timer
    else:
        assert (first, again, UNFROZE in log) == (0, 0, False)
