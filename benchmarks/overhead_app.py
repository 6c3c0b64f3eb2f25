"""The benchmark's app: the same one-INCR task as plain Celery and as ResilientTask.

``install(app)`` runs unless ``BENCH_PLUGIN=0`` (``overhead_plugin.py``'s plain worker);
``BENCH_FETCH=0`` turns the atomic fetch off (``resilience_fetch = False``).
"""

from __future__ import annotations

import os

import redis
from celery import Celery, Task

from celery_resilience import ResilientTask, install

app = Celery("overhead", broker=os.environ["BENCH_BROKER_URL"], set_as_current=False)
if os.environ.get("BENCH_PLUGIN", "1") == "1":
    install(app)
app.conf.update(
    task_ignore_result=True,
    worker_prefetch_multiplier=4,
    resilience_fetch=os.environ.get("BENCH_FETCH", "1") == "1",
)
client = redis.Redis.from_url(os.environ["BENCH_BROKER_URL"])


@app.task(name="bench.plain", base=Task)
def plain(key: str) -> None:
    client.incr(key)


@app.task(name="bench.plain_late", base=Task, acks_late=True)
def plain_late(key: str) -> None:
    """A plain task acknowledged after it ran, as ResilientTask is (``acks_late``)."""
    client.incr(key)


@app.task(name="bench.resilient", base=ResilientTask)
def resilient(key: str) -> None:
    client.incr(key)
