"""ResilientTask on a real worker and a real redis-server: what retries and what does not."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import redis
from celery import Celery, Task
from celery.signals import before_task_publish

from celery_resilience import ResilientTask, install
from tests.bench.redis_server import RedisServer
from tests.bench.workers import inprocess_worker

pytestmark = pytest.mark.integration
REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    app = Celery("it", broker=redis_url, backend=redis_url, task_cls=ResilientTask,
                 set_as_current=False)  # fmt: skip
    app.conf.update(
        resilience_inprocess_backoff=0.01,
        resilience_retry_backoff=0.05,
        resilience_retry_backoff_max=0.1,
        broker_transport_options={
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
        },
    )
    install(app)
    yield app


@pytest.fixture
def events(signals_seen: list[Any]) -> Callable[[], list[str]]:
    """The names of the retry signals sent so far."""
    retry = {"transient_error", "retry_scheduled", "retries_exhausted"}
    return lambda: [name for name, _, _ in signals_seen if name in retry]


def wrongtype(client: redis.Redis) -> None:
    client.set("a-string", "x")
    client.lpush("a-string", "y")  # WRONGTYPE Operation against a key holding the wrong kind


@pytest.mark.parametrize("base", [ResilientTask, "autoretry"], ids=["resilient", "control"])
def test_wrongtype_fails_on_the_first_attempt(
    app: Celery, redis_url: str, events: Callable[[], list[str]], base: Any
) -> None:
    calls: list[int] = []
    client = redis.Redis.from_url(redis_url)
    options: dict[str, Any] = {"base": ResilientTask}
    if base == "autoretry":  # plain Celery as usually configured: every RedisError retried
        options = {"base": Task, "autoretry_for": (redis.RedisError,), "max_retries": 2,
                   "default_retry_delay": 0}  # fmt: skip

    @app.task(name="it.wrongtype", shared=False, **options)
    def task() -> None:
        calls.append(1)
        wrongtype(client)

    with inprocess_worker(app):
        result = task.delay()
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            result.get(timeout=30)
    if base is ResilientTask:
        assert (len(calls), events()) == (1, [])
    else:
        assert len(calls) == 3  # the control retries a terminal error until its limit


def test_authentication_error_fails_on_the_first_attempt(
    app: Celery, private_redis: RedisServer, events: Callable[[], list[str]]
) -> None:
    private_redis.client().config_set("requirepass", "right")
    calls: list[int] = []

    @app.task(name="it.auth", shared=False)
    def task() -> None:
        calls.append(1)
        redis.Redis.from_url(f"redis://:wrong@127.0.0.1:{private_redis.port}/0").ping()

    with inprocess_worker(app):
        result = task.delay()
        with pytest.raises(redis.AuthenticationError):
            result.get(timeout=30)
    assert (len(calls), events()) == (1, [])


def test_retries_stop_at_the_limit_and_fail_with_the_original_error(
    app: Celery, events: Callable[[], list[str]]
) -> None:
    calls: list[int] = []
    exhausted: list[str] = []

    class Job(ResilientTask):
        def on_retries_exhausted(self, exc: Any, task_id: Any, args: Any, kwargs: Any) -> None:
            exhausted.append(task_id)

    @app.task(name="it.always", base=Job, inprocess_budget=0, max_retries=2, shared=False)
    def task() -> None:
        calls.append(1)
        raise ConnectionResetError(104, "Connection reset by peer")

    with inprocess_worker(app):
        result = task.delay()
        with pytest.raises(ConnectionResetError):
            result.get(timeout=30)
    assert len(calls) == 3
    assert events().count("retry_scheduled") == 2 and events().count("retries_exhausted") == 1
    assert exhausted == [result.id]


def test_in_process_tier_reruns_without_publishing(
    app: Celery, events: Callable[[], list[str]]
) -> None:
    calls: list[int] = []
    published: list[str] = []

    def on_publish(sender: Any = None, **kw: Any) -> None:
        published.append(sender)

    @app.task(name="it.blip", shared=False)
    def task() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise redis.ConnectionError("Connection reset by peer")
        return "done"

    before_task_publish.connect(on_publish, weak=False)
    try:
        with inprocess_worker(app):
            assert task.delay().get(timeout=30) == "done"
    finally:
        before_task_publish.disconnect(on_publish)
    assert len(calls) == 3 and published == ["it.blip"]  # only the original publish
    assert events() == ["transient_error", "transient_error"]


def test_celery_retry_goes_back_to_its_queue_and_priority(app: Celery) -> None:
    app.conf.task_routes = {"it.routed": {"queue": "elsewhere"}}
    app.conf.task_default_queue = "default"
    seen: list[tuple[Any, Any]] = []

    def on_publish(sender: Any = None, routing_key: Any = None, properties: Any = None,
                   **kw: Any) -> None:  # fmt: skip
        seen.append((routing_key, (properties or {}).get("priority")))

    calls: list[int] = []

    @app.task(name="it.routed", inprocess_budget=0, shared=False)
    def task() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise redis.ConnectionError("Connection reset by peer")
        return "ok"

    before_task_publish.connect(on_publish, weak=False)
    try:
        with inprocess_worker(app, queues=["low"]):
            assert task.apply_async(queue="low", priority=9).get(timeout=30) == "ok"
    finally:
        before_task_publish.disconnect(on_publish)
    assert seen == [("low", 9), ("low", 9)]


def test_bad_setting_stops_worker_start_naming_the_key() -> None:
    env = {**os.environ, "PYTHONPATH": REPO, "CELERY_RESILIENCE_RETRY_BACKOFF": "-1",
           "PIPELINE_BROKER_URL": "redis://127.0.0.1:1/0"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "examples.pipeline.app", "worker", "-P", "solo"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "ConfigurationError: invalid setting resilience_retry_backoff='-1'" in proc.stderr
