"""The urgent-latency benchmark's worker: ``celery -A benchmarks.urgent_app worker -Q high``.

Seed 002's priorities app (``examples/priorities``, layout ``one``: queue ``high``,
priority steps 0-9, 0 polled first) with the plugin or without it (``URGENT_PLUGIN=1``
or ``0``; ``URGENT_FETCH_WAIT`` sets ``resilience_fetch_wait``; ``URGENT_GC_OFF=1``
turns automatic garbage collection off in the worker, a diagnostic), plus two tasks:
``bench.low``, the backlog (its countdown never comes due during a run), and
``bench.urgent(published)``, which records in :data:`LATENCIES` how many seconds after
its publish it started.
"""

from __future__ import annotations

import gc
import os
import time

import redis
from celery import Celery

from examples.priorities.app import create_app

#: Redis list of the urgent tasks' latencies (seconds, publish to start), in start order.
LATENCIES = "bench:urgent:latency"


def register(app: Celery, client: redis.Redis) -> None:
    @app.task(name="bench.urgent", shared=False)
    def urgent(published: float) -> None:
        client.rpush(LATENCIES, time.time() - published)

    @app.task(name="bench.low", shared=False)
    def low() -> None:
        """Never runs during a benchmark: its countdown outlasts the run."""


def _conf() -> dict[str, float]:
    wait = os.environ.get("URGENT_FETCH_WAIT")
    return {"resilience_fetch_wait": float(wait)} if wait else {}


if "URGENT_BROKER_URL" in os.environ:  # the worker (the benchmark reads LATENCIES only)
    app = create_app(os.environ["URGENT_BROKER_URL"],
                     plugin=os.environ.get("URGENT_PLUGIN", "1") == "1", **_conf())  # fmt: skip
    register(app, redis.Redis.from_url(os.environ["URGENT_BROKER_URL"]))
    if os.environ.get("URGENT_GC_OFF") == "1":
        gc.disable()  # before the pool forks: the children inherit it
