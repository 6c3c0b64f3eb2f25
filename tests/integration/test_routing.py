"""Seed 002: restored and retried tasks go back to their origin queue and priority.

Two levels, both on a real redis-server:

- kombu's own Redis channel in this process (fast): a message taken and handed back by
  ``reject(requeue=True)``, by closing the channel (what a shutdown does) or by another
  connection's visibility-timeout sweep;
- the seed-002 scenario on real prefork workers (``examples/priorities``): ETA tasks
  reserved by a worker that is stopped warm (SIGTERM), cold (SIGQUIT) or killed (SIGKILL,
  then swept by a second worker).

Every "fixed" test has a control without the guard. kombu <= 5.3 loses the priority of
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
from kombu import Connection, Exchange, Producer, Queue
from kombu.utils.json import loads

from celery_resilience import keepalive, routing, signals
from celery_resilience.routing import RoutingOptions
from examples.priorities.app import LOW, MEDIUM, RAN, URGENT, create_app, priority_key
from tests import upstream
from tests.bench.redis_server import RedisServer
from tests.bench.workers import PreforkWorker, inprocess_worker

pytestmark = pytest.mark.integration
REPO = str(Path(__file__).resolve().parents[2])
KOMBU_DROPS_PRIORITY = upstream.KOMBU_RESTORE_DROPS_PRIORITY
STEPS = {"priority_steps": list(range(10)), "queue_order_strategy": "priority"}
QUARANTINE = "resilience.quarantine"


@pytest.fixture(autouse=True)
def routing_off_afterwards() -> Iterator[None]:
    """Each test turns the guard on itself (the plugin, or by hand); none leaks it."""
    routing.disable()
    routing._malformed_warned.clear()
    yield
    routing.disable()
    keepalive.disable()
    routing._malformed_warned.clear()


def guard(on: bool, quarantine: str = QUARANTINE) -> None:
    if on:
        routing.enable(lambda: RoutingOptions(quarantine))
    else:
        routing.disable()


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


# -- kombu's channel in this process --------------------------------------------------------


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def connect(redis_url: str) -> Iterator[Callable[..., Connection]]:
    opened: list[Connection] = []

    def make(**options: Any) -> Connection:
        conn = Connection(redis_url, transport_options={**STEPS, **options})
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.release()


def publish(conn: Connection, label: str, priority: int, headers: dict[str, Any],
            queue: Queue | None = None, routing_key: str = "high") -> None:  # fmt: skip
    queue = queue or Queue("high")
    Producer(conn.default_channel).publish(
        {"label": label}, exchange=queue.exchange, routing_key=routing_key, priority=priority,
        headers={"id": label, "task": "t", **headers}, declare=[queue], serializer="json",
    )  # fmt: skip


def take(conn: Connection, queue: str = "high") -> Any:
    message = Queue(queue).bind(conn.default_channel).get(no_ack=False)
    assert message is not None, f"nothing to take from {queue}"
    return message


def payloads(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    return [loads(raw) for raw in client.lrange(key, 0, -1)]


@pytest.mark.parametrize("on", [True, False], ids=["guard", "control"])
def test_requeue_goes_back_to_the_priority_list(
    on: bool, connect: Callable[..., Connection], client: redis.Redis
) -> None:
    guard(on)
    conn = connect()
    publish(conn, "low", LOW, stamp("high", LOW))
    take(conn).reject(requeue=True)
    if on or not KOMBU_DROPS_PRIORITY:
        assert lengths(client, "high") == {"high/9": 1}
    else:
        assert lengths(client, "high") == {"high": 1}  # the seed's bug: priority lost


@pytest.mark.parametrize("on", [True, False], ids=["guard", "control"])
def test_closing_the_channel_restores_to_the_priority_lists(
    on: bool, connect: Callable[..., Connection], client: redis.Redis
) -> None:
    guard(on)
    conn = connect()
    for i in range(4):
        publish(conn, f"low{i}", LOW, stamp("high", LOW))
    publish(conn, "medium", MEDIUM, stamp("high", MEDIUM))
    for _ in range(5):
        take(conn)
    assert lengths(client, "high") == {}
    conn.release()  # what a worker's shutdown does: restore everything unacked
    if on or not KOMBU_DROPS_PRIORITY:
        assert lengths(client, "high") == {"high/3": 1, "high/9": 4}
    else:
        assert lengths(client, "high") == {"high": 5}
    assert client.hlen("unacked") == 0


@pytest.mark.parametrize("on", [True, False], ids=["guard", "control"])
def test_placement_and_redelivered_flag_are_kombus(
    on: bool, connect: Callable[..., Connection], client: redis.Redis
) -> None:
    """reject(requeue) puts the message at the tail, a shutdown restore at the head."""
    guard(on)
    conn = connect()
    for label in ("a", "b", "c"):
        publish(conn, label, LOW, stamp("high", LOW))
    take(conn).reject(requeue=True)  # "a" behind "c"
    take(conn)  # "b", restored at the head on close
    conn.release()
    low = priority_key("high", LOW)
    # (id, redelivered) in the order BRPOP reads them.
    expect = {low: [("b", True), ("c", None), ("a", True)]}
    if KOMBU_DROPS_PRIORITY and not on:  # "a" jumps to the bare key and is taken again
        expect = {"high": [("a", True)], low: [("b", None), ("c", None)]}
    stored = {key: list(reversed(payloads(client, key))) for key in expect}
    assert {key: [(p["headers"]["id"], p["headers"].get("redelivered")) for p in ps]
            for key, ps in stored.items()} == expect  # fmt: skip
    marked = [p for ps in stored.values() for p in ps if p["headers"].get("redelivered")]
    assert marked and all(p["properties"]["delivery_info"]["redelivered"] for p in marked)


@pytest.mark.parametrize("on", [True, False], ids=["guard", "control"])
def test_visibility_sweep_by_another_connection(
    on: bool, connect: Callable[..., Connection], client: redis.Redis
) -> None:
    guard(on)
    dead = connect()
    publish(dead, "low", LOW, stamp("high", LOW))
    publish(dead, "medium", MEDIUM, stamp("high", MEDIUM))
    take(dead), take(dead)
    dead.default_channel.qos._delivered.clear()  # a killed worker restores nothing
    dead.release()
    assert client.hlen("unacked") == 2
    sweeper = connect(visibility_timeout=0)
    sweeper.default_channel.qos.restore_visible(num=None)
    if on or not KOMBU_DROPS_PRIORITY:
        assert lengths(client, "high") == {"high/3": 1, "high/9": 1}
    else:
        assert lengths(client, "high") == {"high": 2}
    assert client.hlen("unacked") == 0


def events_queue() -> Queue:
    return Queue("events", Exchange("bus", type="topic"), routing_key="events.#")


@pytest.mark.parametrize("on", [True, False], ids=["guard", "control"])
def test_topic_message_restored_by_a_stranger_is_not_lost(
    on: bool, connect: Callable[..., Connection], client: redis.Redis
) -> None:
    """The sweeping connection never declared the topic exchange: kombu drops the messages."""
    guard(on)
    publisher = connect()
    for i in range(5):
        publish(publisher, f"e{i}", LOW, stamp("events", LOW, "bus", "events.user"),
                queue=events_queue(), routing_key="events.user")  # fmt: skip
    dead = connect()
    for _ in range(5):
        take(dead, "events")
    dead.default_channel.qos._delivered.clear()
    dead.release()
    connect(visibility_timeout=0).default_channel.qos.restore_visible(num=None)
    assert client.hlen("unacked") == 0
    expected = {"events/9": 5} if on else {}  # the control loses all 5 (kombu 5.3-5.7)
    assert lengths(client, "events", QUARANTINE) == expected


@pytest.mark.parametrize("on", [True, False], ids=["guard", "control"])
def test_unstamped_message_kombu_would_drop_goes_to_quarantine(
    on: bool, connect: Callable[..., Connection], client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    guard(on)
    publisher = connect()
    publish(publisher, "e0", LOW, {}, queue=events_queue(), routing_key="events.user")
    dead = connect()
    take(dead, "events")
    dead.default_channel.qos._delivered.clear()
    dead.release()
    connect(visibility_timeout=0).default_channel.qos.restore_visible(num=None)
    assert lengths(client, "events", QUARANTINE) == ({QUARANTINE: 1} if on else {})
    warnings = [r.getMessage() for r in caplog.records if r.name == "celery_resilience.routing"]
    assert len(warnings) == (1 if on else 0)
    if on:
        assert "moved to quarantine queue 'resilience.quarantine'" in warnings[0]
        assert payloads(client, QUARANTINE)[0]["headers"]["redelivered"] is True


@pytest.mark.parametrize("stamped", [False, True], ids=["unstamped", "malformed"])
def test_unstamped_and_malformed_restore_exactly_as_kombu(
    stamped: bool, connect: Callable[..., Connection], client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Same messages, same steps, guard on and off: the same lists, byte for byte."""
    headers = {**stamp("other", URGENT), routing.PRIORITY_HEADER: "9"} if stamped else {}
    seen = []
    for on in (False, True):
        guard(on)
        client.flushdb()
        conn = connect()
        for i, pri in enumerate((LOW, MEDIUM, URGENT, LOW)):
            publish(conn, f"m{i}", pri, headers)
        take(conn).reject(requeue=True)
        take(conn)
        conn.release()
        seen.append({key: [without_tag(raw) for raw in client.lrange(key, 0, -1)]
                     for key in sorted(client.keys("high*"))})  # fmt: skip
    assert seen[0] == seen[1] and seen[0]
    malformed = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(malformed) == (1 if stamped else 0)  # one per process, not one per message


def without_tag(raw: bytes) -> dict[str, Any]:
    """A stored message without its delivery tag (a fresh uuid per publish)."""
    payload: dict[str, Any] = loads(raw)
    del payload["properties"]["delivery_tag"]
    return payload


def test_rerouted_signal(connect: Callable[..., Connection], client: redis.Redis) -> None:
    guard(True)
    got: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        got.append(kwargs)

    signals.message_rerouted.connect(receiver)
    try:
        conn = connect()
        publish(conn, "moved", LOW, stamp("high", LOW), queue=Queue("elsewhere"),
                routing_key="elsewhere")  # fmt: skip
        take(conn, "elsewhere").reject(requeue=True)
    finally:
        signals.message_rerouted.disconnect(receiver)
    original = [priority_key("elsewhere", LOW)] if not KOMBU_DROPS_PRIORITY else ["elsewhere"]
    assert got == [{"queue": "high", "priority": LOW, "original": original, "reason": "origin",
                    "task_id": "moved"}]  # fmt: skip
    assert lengths(client, "high", "elsewhere") == {"high/9": 1}


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


@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_unstamped_messages_restore_as_kombu_would(
    plugin: bool, private_redis: RedisServer, broker: redis.Redis,
    prefork_worker: Callable[..., PreforkWorker],
) -> None:  # fmt: skip
    """A publisher without the plugin shares the Redis of a worker with it."""
    worker = priorities_worker(prefork_worker, private_redis, plugin)
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
