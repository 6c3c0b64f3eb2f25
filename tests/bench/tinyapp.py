"""A tiny Celery app for bench self-tests, run by ``celery -A tests.bench.tinyapp worker``.

The broker comes from ``$BENCH_BROKER_URL`` (results go to the same Redis unless
``$BENCH_BACKEND_URL`` says otherwise); there is deliberately no fallback to a system Redis.
Task names are explicit so producers can ``send_task`` them without importing this module.
"""

from __future__ import annotations

import os
import time

from celery import Celery

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "memory://")
BACKEND_URL = os.environ.get(
    "BENCH_BACKEND_URL", BROKER_URL if BROKER_URL.startswith("redis") else "cache+memory://"
)

app = Celery("tinyapp", broker=BROKER_URL, backend=BACKEND_URL)
app.conf.broker_connection_retry_on_startup = True


@app.task(name="bench.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="bench.pid")
def pid() -> int:
    """The pid of the process that ran the task (a pool child under prefork)."""
    return os.getpid()


@app.task(name="bench.sleep")
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
