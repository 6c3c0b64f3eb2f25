"""The freezer in a real prefork worker: a held ETA backlog is frozen, runs, and is let go.

The latency it buys is a benchmark (benchmarks/urgent_latency.py: urgent tasks while
10 000 ETA tasks are restored, p99 against plain Celery's); here, what it does and that
nothing is lost while it does it.
"""

from __future__ import annotations

import re

import pytest

from tests.bench._proc import tail
from tests.bench.jobapp import progress, wait_until
from tests.bench.redis_server import RedisServer
from tests.integration.test_redis_restarts import producer, worker_for

pytestmark = pytest.mark.integration
BACKLOG = 1500
UNFROZE = re.compile(r"resilience: unfroze \d+ objects \((\d+) of (\d+) ETA tasks still held\)")
FROZEN = re.compile(r"resilience: (\d+) objects frozen, the collector need not walk them "
                    r"\((\d+) freezes")  # fmt: skip


@pytest.mark.parametrize("freeze", [True, False], ids=["freeze", "control-no-freeze"])
def test_a_held_eta_backlog_is_frozen_then_let_go_once_it_ran(
    private_redis: RedisServer, freeze: bool
) -> None:
    client = private_redis.client()
    app = producer(private_redis.url())
    # Only arrivals freeze here (a 10 s collection never happens): the count is exact.
    env = {"JOB_GC_FREEZE": int(freeze), "JOB_GC_FREEZE_EVERY": 500, "JOB_GC_FREEZE_AFTER": 10}
    with worker_for(private_redis.url(), plugin=True, **env) as worker:
        with app.producer_or_acquire() as pub:
            for n in range(BACKLOG):
                app.send_task("job.item", args=[n, 0.0], countdown=6, producer=pub)
        held = wait_until(lambda: client.hlen("unacked") == BACKLOG, 30)
        done = wait_until(lambda: progress(client, BACKLOG)["done"] == BACKLOG, 60)
        # The check runs every 5 s: the backlog is gone, so what it froze is let go.
        let_go = wait_until(lambda: "unfroze" in worker.log, 12) if freeze else False
        log = worker.log
    reports = [(int(n), int(k)) for n, k in FROZEN.findall(log)]
    print(f"\n  {'freeze' if freeze else 'no freeze'}: held={held} job={progress(client, BACKLOG)} "
          f"reports={reports} unfroze={let_go}")  # fmt: skip
    assert held and done, tail(log, 40)
    assert progress(client, BACKLOG) == {"done": BACKLOG, "count": BACKLOG, "duplicates": 0}
    if freeze:
        assert reports and reports[-1][1] == BACKLOG // 500, tail(log, 40)
        assert let_go, tail(log, 40)
        (left, peak), *_ = UNFROZE.findall(log)
        assert int(left) * 2 <= int(peak) and int(peak) >= BACKLOG  # let go once it ran
    else:
        assert reports == [] and "unfroze" not in log
