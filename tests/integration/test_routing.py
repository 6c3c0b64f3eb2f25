"""Seed 002 on real prefork workers: restored and retried tasks go back to their origin
queue and priority.

ETA tasks reserved by a worker that is stopped warm (SIGTERM), cold (SIGQUIT) or killed
(SIGKILL, then swept by a second worker), from ``examples/priorities``. The same restores
on one channel in this process: tests/integration/redis/test_restore.py.

Every "fixed" test has a control without the plugin. kombu <= 5.3 loses the priority of
every restored message (the bug of the seed); later kombu keeps it, so there the control
must match the fix exactly. Undeclared topic exchanges lose messages on every version.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import redis
from celery import Celery

from celery_resilience import routing
from examples.priorities.app import LOW, MEDIUM, RAN, URGENT, create_app, priority_key
from tests import upstream
from tests.bench.redis_server import RedisServer
from tests.bench.workers import PreforkWorker, inprocess_worker

pytestmark = pytest.mark.integration
REPO = str(Path(__file__).resolve().parents[2])
KOMBU_DROPS_PRIORITY = upstream.KOMBU_RESTORE_DROPS_PRIORITY
STEPS = {"priority_steps": list(range(10)), "queue_order_strategy": "priority"}
QUARANTINE = "resilience.quarantine"


def stamp(
    queue: str | None, priority: int | None, exchange: str = "", rk: str = ""
) -> dict[str, Any]:
    return routing.Origin(queue, exchange, rk or queue or "", priority).headers()


def lengths(client: redis.Redis, *queues: str) -> dict[str, int]:
    """Non-empty priority lists of ``queues``: {"high": n, "high/9": m, ...}."""
    found = {}
    for queue in queues:
        for step in range(10):
            n = client.llen(priority_key(queue, step))
            if n:
                found[f"{queue}/{step}" if step else queue] = n
    return found


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- seed 002 on real prefork workers -------------------------------------------------------

N_LOW, N_MEDIUM, N_URGENT = 20, 5, 5


def priorities_worker(
    make: Callable[..., PreforkWorker], server: RedisServer, plugin: bool,
    queues: tuple[str, ...] = ("high",), layout: str = "one",
    visibility_timeout: float | None = None, **kwargs: Any,
) -> PreforkWorker:  # fmt: skip
    env = {"PRIORITIES_BROKER_URL": server.url(0), "PRIORITIES_PLUGIN": "1" if plugin else "0",
           "PRIORITIES_LAYOUT": layout,
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    if visibility_timeout is not None:
        env["PRIORITIES_VISIBILITY_TIMEOUT"] = str(visibility_timeout)
    return make("examples.priorities.worker", cwd=REPO, queues=list(queues), env=env, **kwargs)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def broker(private_redis: RedisServer) -> Iterator[redis.Redis]:
    c = private_redis.client()
    yield c
    c.close()


def publisher(server: RedisServer, plugin: bool, layout: str = "one") -> Celery:
    """The app that publishes; with the plugin it stamps (install() enables routing here)."""
    return create_app(server.url(0), plugin=plugin, layout=layout)


def reserve(app: Celery, broker: redis.Redis, low: str = "high", medium: str = "high",
            countdown: float = 300) -> None:  # fmt: skip
    """Publish seed 002's ETA tasks and wait until the worker holds all of them."""
    for i in range(N_LOW):
        app.send_task("priorities.record", (f"low{i}",), queue=low, priority=LOW,
                      countdown=countdown)  # fmt: skip
    for i in range(N_MEDIUM):
        app.send_task("priorities.record", (f"medium{i}",), queue=medium, priority=MEDIUM,
                      countdown=countdown)  # fmt: skip
    queues = {low, medium}
    wait_for(
        "the worker to reserve every ETA task",
        lambda: broker.hlen("unacked") == N_LOW + N_MEDIUM and not lengths(broker, *queues),
    )
    assert broker.llen(RAN) == 0


def restored(low: str = "high", medium: str = "high") -> dict[str, int]:
    """Where seed 002's tasks belong: their own priority lists."""
    if low == medium:
        return {f"{low}/{MEDIUM}": N_MEDIUM, f"{low}/{LOW}": N_LOW}
    return {f"{medium}/{MEDIUM}": N_MEDIUM, f"{low}/{LOW}": N_LOW}


def lost_priority(low: str = "high", medium: str = "high") -> dict[str, int]:
    """Where kombu <= 5.3 puts them: the bare keys, polled before any priority list."""
    if low == medium:
        return {low: N_LOW + N_MEDIUM}
    return {low: N_LOW, medium: N_MEDIUM}


def expected(plugin: bool, low: str = "high", medium: str = "high") -> dict[str, int]:
    if plugin or not KOMBU_DROPS_PRIORITY:
        return restored(low, medium)
    return lost_priority(low, medium)


#: The two layouts of examples/priorities: (worker queues, queue of the low, of the medium).
LAYOUTS = {
    "one": (("high",), "high", "high"),
    "three": (("high", "medium", "low"), "low", "medium"),
}


@pytest.mark.parametrize("layout", ["one", "three"])
@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGQUIT], ids=["warm", "cold"])
def test_shutdown_restores_eta_tasks_to_their_priority_lists(
    plugin: bool, sig: int, layout: str, private_redis: RedisServer, broker: redis.Redis,
    prefork_worker: Callable[..., PreforkWorker],
) -> None:  # fmt: skip
    queues, low, medium = LAYOUTS[layout]
    worker = priorities_worker(prefork_worker, private_redis, plugin, queues, layout)
    reserve(publisher(private_redis, plugin, layout), broker, low, medium)
    worker.stop(sig)
    assert broker.hlen("unacked") == 0
    assert lengths(broker, *queues) == expected(plugin, low, medium)


@pytest.mark.fault
@pytest.mark.parametrize("layout", ["one", "three"])
@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_killed_worker_is_swept_to_the_priority_lists(
    plugin: bool, layout: str, private_redis: RedisServer, broker: redis.Redis,
    prefork_worker: Callable[..., PreforkWorker],
) -> None:  # fmt: skip
    queues, low, medium = LAYOUTS[layout]
    worker = priorities_worker(prefork_worker, private_redis, plugin, queues, layout)
    reserve(publisher(private_redis, plugin, layout), broker, low, medium)
    worker.kill()
    assert broker.hlen("unacked") == N_LOW + N_MEDIUM  # a SIGKILL restores nothing
    newest = max(score for _, score in broker.zrange("unacked_index", 0, -1, withscores=True))
    wait_for("the visibility timeout to pass", lambda: time.time() > newest + 1.5)
    # The sweeper consumes another queue: it restores, and leaves what it restored alone.
    priorities_worker(prefork_worker, private_redis, plugin, ("sweeper",), layout,
                      visibility_timeout=1)  # fmt: skip
    wait_for("the sweep", lambda: broker.hlen("unacked") == 0)
    assert lengths(broker, *queues) == expected(plugin, low, medium)


COUNTDOWN = 10.0  # long enough to reserve and stop the first worker before any ETA


@pytest.mark.slow
@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_urgent_tasks_published_after_a_restart_run_first(
    plugin: bool, private_redis: RedisServer, broker: redis.Redis,
    prefork_worker: Callable[..., PreforkWorker],
) -> None:  # fmt: skip
    """Seed 002's outage: after a restart the restored backlog ran before the users' tasks."""
    app = publisher(private_redis, plugin)
    worker = priorities_worker(prefork_worker, private_redis, plugin)
    due = time.time() + COUNTDOWN
    reserve(app, broker, countdown=COUNTDOWN)
    worker.stop(signal.SIGTERM)
    assert broker.llen(RAN) == 0  # nothing ran early: the order below means something
    for i in range(N_URGENT):
        app.send_task("priorities.record", (f"urgent{i}",), queue="high", priority=URGENT)
    wait_for("the restored tasks to be due", lambda: time.time() > due + 1)
    priorities_worker(prefork_worker, private_redis, plugin, concurrency=1,
                      extra_args=["--prefetch-multiplier", "1"])  # fmt: skip
    total = N_LOW + N_MEDIUM + N_URGENT
    wait_for("every task to run", lambda: broker.llen(RAN) == total)
    ran = [label.decode() for label in broker.lrange(RAN, 0, -1)]
    urgent = [i for i, label in enumerate(ran) if label.startswith("urgent")]
    print("run order:", ran)
    if plugin or not KOMBU_DROPS_PRIORITY:
        assert urgent == [0, 1, 2, 3, 4]
    else:
        assert urgent == [25, 26, 27, 28, 29]  # the seed: behind the whole restored backlog


def test_unstamped_messages_restore_as_kombu_would(
    private_redis: RedisServer, broker: redis.Redis, prefork_worker: Callable[..., PreforkWorker]
) -> None:
    """A publisher without the plugin shares the Redis of a worker with it: the worker
    hands its messages back where kombu would (no fix here, so no control)."""
    worker = priorities_worker(prefork_worker, private_redis, True)
    reserve(publisher(private_redis, plugin=False), broker)
    worker.stop(signal.SIGTERM)
    assert lengths(broker, "high") == expected(plugin=False)


@pytest.mark.fault
@pytest.mark.parametrize(
    ("stamped", "guarded", "found"),
    [(True, True, {"events/9": 5}), (False, True, {QUARANTINE: 5}), (False, False, {})],
    ids=["plugin", "unstamped-quarantined", "control-lost"],
)
def test_topic_messages_swept_by_a_worker_that_never_declared_the_exchange(
    stamped: bool, guarded: bool, found: dict[str, int], private_redis: RedisServer,
    broker: redis.Redis, prefork_worker: Callable[..., PreforkWorker],
) -> None:  # fmt: skip
    worker = priorities_worker(prefork_worker, private_redis, stamped, ("events",), "topic")
    app = publisher(private_redis, stamped, "topic")
    for i in range(5):
        app.send_task("priorities.record", (f"e{i}",), queue="events", routing_key="events.user",
                      priority=LOW, countdown=300)  # fmt: skip
    wait_for(
        "the worker to reserve them",
        lambda: broker.hlen("unacked") == 5 and not lengths(broker, "events"),
    )
    worker.kill()
    newest = max(score for _, score in broker.zrange("unacked_index", 0, -1, withscores=True))
    wait_for("the visibility timeout to pass", lambda: time.time() > newest + 1.5)
    priorities_worker(prefork_worker, private_redis, guarded, ("sweeper",), "one",
                      visibility_timeout=1)  # fmt: skip
    wait_for("the sweep", lambda: broker.hlen("unacked") == 0)
    assert lengths(broker, "events", QUARANTINE) == found


# -- retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_retry_goes_to_the_stamped_origin_not_where_it_was_consumed(
    plugin: bool, redis_url: str, client: redis.Redis
) -> None:
    """A worker drains the quarantine; the retry of a task from `low` (priority 9) goes back
    to `low` priority 9, although task_routes and the default queue say `high`."""
    app = create_app(redis_url, plugin=plugin)
    app.conf.task_routes = {"priorities.flaky": {"queue": "high"}}
    app.conf.task_default_queue = "high"
    app.send_task("priorities.flaky", ("x",), queue=QUARANTINE, priority=URGENT,
                  headers=stamp("low", LOW))  # fmt: skip
    with inprocess_worker(app, queues=[QUARANTINE]):
        if plugin:
            wait_for("the retry", lambda: client.llen(priority_key("low", LOW)) == 1)
        else:
            wait_for("the retry to run", lambda: client.llen(RAN) == 2)
    assert [r.decode() for r in client.lrange(RAN, 0, -1)] == (
        ["x:0"] if plugin else ["x:0", "x:1"]
    )
    assert lengths(client, "low", "high", QUARANTINE) == ({"low/9": 1} if plugin else {})
