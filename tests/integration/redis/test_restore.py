"""Restores on the plugin's Redis channel, in this process: to the stamped queue and
priority, as kombu would where nothing is stamped, to quarantine where kombu would drop
the message, and one log line and one ``message_restored`` per message with its reason.

Each fix has its control on kombu's own transport, asserted where kombu still has the
bug (tests/upstream.py). The same scenarios on prefork workers: tests/integration/test_routing.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue
from kombu.utils.json import loads

from celery_resilience import routing
from celery_resilience.redis import restore
from examples.priorities.app import LOW, MEDIUM, URGENT, priority_key
from tests import upstream
from tests.conftest import PluginArm

pytestmark = pytest.mark.integration
KOMBU_DROPS_PRIORITY = upstream.KOMBU_RESTORE_DROPS_PRIORITY
STEPS = {"priority_steps": list(range(10)), "queue_order_strategy": "priority"}
QUARANTINE = "resilience.quarantine"


@pytest.fixture(autouse=True)
def warn_again() -> Iterator[None]:
    routing._malformed_warned.clear()
    yield
    routing._malformed_warned.clear()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def connect(
    redis_url: str, plugin_arm: Callable[..., PluginArm]
) -> Iterator[Callable[..., Connection]]:
    """``make(on, **transport_options)``: the plugin's transport (a publisher's: no
    worker ledger) or kombu's own; priority steps 0-9 either way."""
    opened: list[Connection] = []

    def make(on: bool, **options: Any) -> Connection:
        if on:
            return plugin_arm(worker=False).connect(**{**STEPS, **options})
        conn = Connection(redis_url, transport_options={**STEPS, **options})
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.release()


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
    conn = connect(on)
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
    conn = connect(on)
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
    conn = connect(on)
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
    dead = connect(on)
    publish(dead, "low", LOW, stamp("high", LOW))
    publish(dead, "medium", MEDIUM, stamp("high", MEDIUM))
    take(dead), take(dead)
    dead.default_channel.qos._delivered.clear()  # a killed worker restores nothing
    dead.release()
    assert client.hlen("unacked") == 2
    sweeper = connect(on, visibility_timeout=0)
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
    publisher = connect(on)
    for i in range(5):
        publish(publisher, f"e{i}", LOW, stamp("events", LOW, "bus", "events.user"),
                queue=events_queue(), routing_key="events.user")  # fmt: skip
    dead = connect(on)
    for _ in range(5):
        take(dead, "events")
    dead.default_channel.qos._delivered.clear()
    dead.release()
    connect(on, visibility_timeout=0).default_channel.qos.restore_visible(num=None)
    assert client.hlen("unacked") == 0
    expected = {"events/9": 5} if on else {}  # the control loses all 5 (kombu 5.3-5.7)
    assert lengths(client, "events", QUARANTINE) == expected


@pytest.mark.parametrize("on", [True, False], ids=["guard", "control"])
def test_unstamped_message_kombu_would_drop_goes_to_quarantine(
    on: bool, connect: Callable[..., Connection], client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    publish(connect(False), "e0", LOW, {}, queue=events_queue(), routing_key="events.user")
    dead = connect(on)
    take(dead, "events")
    dead.default_channel.qos._delivered.clear()
    dead.release()
    connect(on, visibility_timeout=0).default_channel.qos.restore_visible(num=None)
    assert lengths(client, "events", QUARANTINE) == ({QUARANTINE: 1} if on else {})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and r.name.startswith("celery_resilience")]  # fmt: skip
    assert len(warnings) == (1 if on else 0)
    if on:
        assert warnings[0].endswith(
            "to the quarantine queue resilience.quarantine priority 9: visibility timeout"
        )
        assert payloads(client, QUARANTINE)[0]["headers"]["redelivered"] is True


@pytest.mark.parametrize("stamped", [False, True], ids=["unstamped", "malformed"])
def test_unstamped_and_malformed_restore_exactly_as_kombu(
    stamped: bool, connect: Callable[..., Connection], client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Same messages, same steps, plugin's transport and kombu's: the same lists, byte for byte."""
    headers = {**stamp("other", URGENT), routing.PRIORITY_HEADER: "9"} if stamped else {}
    seen = []
    for on in (False, True):
        client.flushdb()
        publisher = connect(False)  # a publisher without the plugin: nothing stamped
        for i, pri in enumerate((LOW, MEDIUM, URGENT, LOW)):
            publish(publisher, f"m{i}", pri, headers)
        conn = connect(on)
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


def test_rerouted_signal(
    connect: Callable[..., Connection], client: redis.Redis, signals_seen: list[Any]
) -> None:
    conn = connect(True)
    publish(conn, "moved", LOW, stamp("high", LOW), queue=Queue("elsewhere"),
            routing_key="elsewhere")  # fmt: skip
    take(conn, "elsewhere").reject(requeue=True)
    got = [kw for name, _, kw in signals_seen if name == "message_rerouted"]
    original = [priority_key("elsewhere", LOW)] if not KOMBU_DROPS_PRIORITY else ["elsewhere"]
    assert got == [{"queue": "high", "priority": LOW, "original": original, "reason": "origin",
                    "task_id": "moved"}]  # fmt: skip
    assert lengths(client, "high", "elsewhere") == {"high/9": 1}


# -- every restore says why --------------------------------------------------------------------


def test_the_channel_stamps_what_it_publishes_with_the_list_it_goes_to(
    connect: Callable[..., Connection], client: redis.Redis
) -> None:
    publish(connect(True), "fresh", LOW, {})
    publish(connect(False), "plain", LOW, {})
    stored = {p["headers"]["id"]: p["headers"] for p in payloads(client, priority_key("high", LOW))}
    assert {k: stored["fresh"][k] for k in routing.HEADERS} == stamp("high", LOW)
    assert not any(k in stored["plain"] for k in routing.HEADERS)


@pytest.mark.parametrize(
    ("scenario", "reason"),
    [("reject", restore.REJECTED), ("close", restore.CONNECTION_LOST),
     ("sweep", restore.VISIBILITY_TIMEOUT)],
)  # fmt: skip
def test_each_restored_message_has_one_log_line_and_one_signal_with_its_reason(
    scenario: str, reason: str, connect: Callable[..., Connection], client: redis.Redis,
    signals_seen: list[Any], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, "celery_resilience")
    conn = connect(True)
    for label in ("a", "b"):
        publish(conn, label, LOW, {})
    for _ in range(2):
        message = take(conn)
        if scenario == "reject":
            message.reject(requeue=True)
    if scenario == "sweep":
        conn.default_channel.qos._delivered.clear()  # a killed worker restores nothing
    conn.release()
    if scenario == "sweep":
        connect(True, visibility_timeout=0).default_channel.qos.restore_visible(num=None)
    restored = [kw for name, _, kw in signals_seen if name == "message_restored"]
    assert sorted(restored, key=lambda kw: kw["task_id"]) == [
        {"task_id": label, "queue": "high", "priority": LOW, "reason": reason}
        for label in ("a", "b")
    ]  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if "restored message" in r.getMessage()]
    assert len(lines) == 2 and all(line.endswith(f"priority {LOW}: {reason}") for line in lines)
    assert {line.split("(task t ")[1].split(")")[0] for line in lines} == {"a", "b"}
    assert lengths(client, "high") == {"high/9": 2}
