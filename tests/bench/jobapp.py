"""A job app for restart tests: ``celery -A tests.bench.jobapp worker``.

Configured from the environment:

- ``JOB_BROKER_URL`` (required; no fallback to a system Redis); job state on the same Redis.
- ``JOB_PLUGIN=1``: ``install(app)`` and ResilientTask; otherwise plain Celery, whose task
  retries its own Redis errors with ``autoretry_for`` (the seed's proposed fix).
- ``JOB_VISIBILITY_TIMEOUT``: kombu's visibility timeout, swept every second.
- ``JOB_ORPHAN_TIMEOUT``, ``JOB_HEARTBEAT``: the reclaimer's settings.
- ``JOB_PRIORITIES=1``: priority steps 0-9, the lists polled in priority order (0 first).
- ``JOB_GC_FREEZE``, ``JOB_GC_FREEZE_EVERY``, ``JOB_GC_FREEZE_AFTER``: the freezer's settings.

``job.item(n, seconds)`` works ``seconds`` and then records item ``n`` idempotently: the
job's count goes up only the first time ``n`` is recorded, however often the task runs;
``runs:<n>`` counts every run, so duplicates show. A task that ends in failure (retries
exhausted, a terminal error) is recorded in ``job:failed``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import redis
from celery import Celery, Task

BROKER_URL = os.environ.get("JOB_BROKER_URL", "memory://")
PLUGIN = os.environ.get("JOB_PLUGIN") == "1"

#: The transport options a producer must share with the workers (priority lists).
PRIORITIES = {"priority_steps": list(range(10)), "queue_order_strategy": "priority"}


def transport_options(environ: Any = os.environ) -> dict[str, Any]:
    options: dict[str, Any] = dict(PRIORITIES) if environ.get("JOB_PRIORITIES") == "1" else {}
    if "JOB_VISIBILITY_TIMEOUT" in environ:
        options.update(
            visibility_timeout=float(environ["JOB_VISIBILITY_TIMEOUT"]),
            unacked_restore_interval=1,  # kombu >= 5.6; older kombu sweeps on its own clock
            unacked_restore_throttle=1,
        )
    return options


app = Celery("jobapp", broker=BROKER_URL, set_as_current=False)
app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)
app.conf.broker_transport_options = transport_options()
_SETTINGS = {"JOB_ORPHAN_TIMEOUT": "resilience_fetch_orphan_timeout",
             "JOB_HEARTBEAT": "resilience_fetch_heartbeat",
             "JOB_GC_FREEZE": "resilience_gc_freeze",
             "JOB_GC_FREEZE_EVERY": "resilience_gc_freeze_every",
             "JOB_GC_FREEZE_AFTER": "resilience_gc_freeze_after"}  # fmt: skip
for env_key, setting in _SETTINGS.items():
    if env_key in os.environ:
        app.conf[setting] = os.environ[env_key]  # strings are parsed and validated

# Count an item only when it is new: a retried or redelivered task cannot count twice.
_RECORD = """
redis.call('INCR', KEYS[3])
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('INCR', KEYS[2])
end
"""
_state = redis.Redis.from_url(BROKER_URL) if BROKER_URL.startswith("redis") else None


class Recorded(Task):  # type: ignore[misc]
    """Records items whose task ended in failure (``job:failed``), Redis permitting."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:  # fmt: skip
        for _ in range(20):
            try:
                assert _state is not None
                _state.sadd("job:failed", args[0])
                return
            except redis.ConnectionError:
                time.sleep(0.5)


if PLUGIN:
    from celery_resilience import ResilientTask, install

    install(app)

    class Base(ResilientTask, Recorded):  # type: ignore[misc]
        """ResilientTask that records its failures."""

    options: dict[str, Any] = {"acks_late": True}
else:
    Base = Recorded  # type: ignore[misc]
    options = {
        "acks_late": True,
        "autoretry_for": (redis.RedisError,),
        "retry_backoff": True,
        "retry_backoff_max": 5,
        "retry_jitter": True,
        "max_retries": 10,
    }


@app.task(name="job.item", base=Base, **options)
def item(n: int, seconds: float = 0.0) -> int:
    if seconds:
        time.sleep(seconds)
    assert _state is not None
    _state.eval(_RECORD, 3, "job:done", "job:count", f"job:runs:{n}", n)
    return n


def progress(client: redis.Redis, n: int) -> dict[str, int]:
    """The job as Redis has it: items recorded, the count, items run more than once."""
    runs = [int(v or 0) for v in client.mget([f"job:runs:{i}" for i in range(n)])] if n else []
    return {
        "done": int(client.scard("job:done")),
        "count": int(client.get("job:count") or 0),
        "duplicates": sum(1 for r in runs if r > 1),
    }


def failed(client: redis.Redis) -> int:
    """Items whose task ended in failure."""
    return int(client.scard("job:failed"))


def in_flight(client: redis.Redis) -> int:
    """Messages the workers' in-flight hashes (celery-resilience) still record."""
    return sum(int(client.hlen(key)) for key in client.scan_iter("resilience.inflight.*"))


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` (a Redis that is down counts as False) for up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except redis.ConnectionError:
            pass
        time.sleep(0.1)
    return False
