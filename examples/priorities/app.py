"""Seed 002's priorities app, importable without side effects (the worker is ``worker.py``).

Two layouts, both with ``queue_order_strategy="priority"`` and priority steps 0-9
(0 is the *highest* priority; Redis keeps one list per step, ``queue`` for step 0 and
``f"{queue}\\x06\\x16{step}"`` for the others):

- ``"one"``: a single queue ``high``; urgency is the message priority (seed 002 as told:
  the default queue takes everything).
- ``"three"``: queues ``high``, ``medium`` and ``low``, consumed in that order, and
  messages with their own priority inside each.
- ``"topic"``: one queue ``events`` bound to the topic exchange ``bus`` by ``events.#``
  (kombu loses such messages when a worker that never declared ``bus`` restores them).

Every task records its label in the Redis list :data:`RAN` when it runs, so a test or
the demo can read the order in which the worker ran them.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery
from kombu import Exchange, Queue

from celery_resilience import ResilientTask, install

LAYOUTS = {"one": ("high",), "three": ("high", "medium", "low"), "topic": ("events",)}
BUS = Exchange("bus", type="topic")
#: Redis list of the labels of the tasks that ran, in the order they ran.
RAN = "priorities:ran"
#: Seed 002's three priorities, as Redis-transport priorities (0 runs first).
URGENT, MEDIUM, LOW = 0, 3, 9


def create_app(
    broker_url: str,
    *,
    plugin: bool = True,
    layout: str = "one",
    visibility_timeout: float | None = None,
    **conf: Any,
) -> Celery:
    """The priorities app; ``plugin=False`` is plain Celery (the before/after control)."""
    app = Celery("priorities", broker=broker_url, set_as_current=False,
                 task_cls=ResilientTask if plugin else "celery.app.task:Task")  # fmt: skip
    if plugin:
        install(app)
    app.conf.update(
        broker_transport_options=_transport_options(visibility_timeout),
        task_queues=_queues(layout),
        task_default_queue="high",
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        # Retries go straight to Celery's tier (the in-process tier would hide them).
        resilience_inprocess_budget=0,
        resilience_retry_backoff=0.05,
        resilience_retry_backoff_max=0.05,
        **conf,
    )
    _register(app, redis.Redis.from_url(broker_url), plugin)
    return app


def _queues(layout: str) -> list[Queue]:
    if layout == "topic":
        return [Queue("events", BUS, routing_key="events.#")]
    return [Queue(name) for name in LAYOUTS[layout]]


def _transport_options(visibility_timeout: float | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "priority_steps": list(range(10)),
        "queue_order_strategy": "priority",
    }
    if visibility_timeout is not None:
        # Sweep every second (kombu >= 5.6 options; older kombu sweeps at startup only).
        options.update(visibility_timeout=visibility_timeout, unacked_restore_interval=1,
                       unacked_restore_throttle=1)  # fmt: skip
    return options


def _register(app: Celery, client: redis.Redis, plugin: bool) -> None:
    @app.task(name="priorities.record", shared=False)
    def record(label: str) -> None:
        client.rpush(RAN, label)

    # Plain Celery retries it with autoretry_for, ResilientTask by itself.
    retry = {} if plugin else {"autoretry_for": (ConnectionError,), "default_retry_delay": 0}

    @app.task(name="priorities.flaky", shared=False, bind=True, **retry)
    def flaky(self: Any, label: str) -> None:
        """Fails with a transient error on its first run, records each run in RAN."""
        client.rpush(RAN, f"{label}:{self.request.retries}")
        if self.request.retries == 0:
            raise ConnectionError("transient, for the retry test")


def priority_key(queue: str, priority: int, sep: str = "\x06\x16") -> str:
    """The Redis list of ``queue`` for ``priority`` (steps 0-9: one list per priority)."""
    return f"{queue}{sep}{priority}" if priority else queue
