"""The atomic fetch and the reclaimer on kombu's own Redis channel, in this process.

Every "fixed" test has a control on kombu's BRPOP (the patches off). Worker-level tests
(prefork workers, Redis restarts) are in test_redis_restarts.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import redis
from celery import Celery
from celery.worker import state
from kombu import Connection, Consumer, Producer, Queue
from kombu.utils.json import loads

from celery_resilience import fetch, inflight, routing
from celery_resilience.fetch import FetchOptions
from celery_resilience.reclaim import OWNERS_KEY, Reclaimer
from tests.bench.redis_server import RedisServer

pytestmark = pytest.mark.integration
QUEUE = "work"


@pytest.fixture(autouse=True)
def patches_off_afterwards() -> Iterator[None]:
    yield
    fetch.disable()
    inflight.disable()
    routing.disable()
    fetch._aside_warned.clear()


def plugin(on: bool, **options: Any) -> None:
    if on:
        inflight.enable("test")
        fetch.enable(lambda: FetchOptions(**options))


@pytest.fixture
def opened() -> Iterator[list[Connection]]:
    conns: list[Connection] = []
    yield conns
    for conn in conns:
        conn.release()


@pytest.fixture
def connect(redis_url: str, opened: list[Connection]) -> Callable[..., Connection]:
    def make(url: str = redis_url, **options: Any) -> Connection:
        conn = Connection(url, transport_options=options)
        opened.append(conn)
        return conn

    return make


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def publish(conn: Connection, n: int, queue: str = QUEUE) -> None:
    Producer(conn.default_channel).publish(
        {"n": n}, routing_key=queue, declare=[Queue(queue)], serializer="json"
    )


def deliver(conn: Connection, queue: str = QUEUE, *, no_ack: bool = False) -> Any:
    """The next message of ``queue``, taken the way a worker takes it (drain_events)."""
    got: list[Any] = []
    channel = conn.default_channel
    with Consumer(channel, [Queue(queue)], callbacks=[lambda _, m: got.append(m)],
                  no_ack=no_ack, accept=["json"]):  # fmt: skip
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:  # socket.timeout: nothing yet
                continue
    assert got, f"nothing delivered from {queue}"
    return got[0]


def reclaimer(url: str, **options: Any) -> Reclaimer:
    transport = options.pop("transport_options", {})
    app = Celery("reclaim", broker=url, set_as_current=False)
    app.conf.broker_transport_options = transport
    return Reclaimer(app, FetchOptions(**options))


def held(client: redis.Redis) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(inflight.held_key()).items()}


def record(client: redis.Redis, tag: str) -> Any:
    raw = client.hget("unacked", tag)
    return loads(raw) if raw is not None else None


# -- what a fetch writes ----------------------------------------------------------------------


@pytest.mark.parametrize("on", [True, False], ids=["fetch", "control"])
def test_a_fetch_records_exactly_what_kombu_records(
    on: bool, connect: Callable[..., Connection], client: redis.Redis
) -> None:
    plugin(on)
    conn = connect()
    publish(conn, 1)
    message = deliver(conn)
    tag = message.delivery_tag
    assert record(client, tag) == [message._raw, "", QUEUE]
    assert client.zscore("unacked_index", tag) is not None
    chan = conn.default_channel.__dict__.get("_resilience_chan")
    assert held(client) == ({tag: chan[0]} if on else {})
    message.ack()
    assert (client.hlen("unacked"), client.zcard("unacked_index"), held(client)) == (0, 0, {})


def test_fetch_takes_the_lists_in_kombus_order(
    connect: Callable[..., Connection], client: redis.Redis
) -> None:
    """Priority lists first to last, as BRPOP does; then the idle wait wakes on a push."""
    plugin(True)
    conn = connect(priority_steps=[0, 3, 6, 9])
    for n, priority in ((1, 9), (2, 0), (3, 6)):
        Producer(conn.default_channel).publish(
            {"n": n}, routing_key=QUEUE, declare=[Queue(QUEUE)], priority=priority,
            serializer="json",
        )  # fmt: skip
    bodies = [deliver(conn).decode()["n"] for _ in range(3)]
    assert bodies == [2, 3, 1]
    state = conn.default_channel.__dict__["_resilience_fetch"]
    assert state.last_key == f"{QUEUE}\x06\x169"


# -- the window between taking a message and recording it ------------------------------------


@pytest.mark.fault
@pytest.mark.parametrize("on", [True, False], ids=["fetch", "control"])
def test_a_reply_lost_after_redis_took_the_message_loses_nothing(
    on: bool, private_redis: RedisServer, reset_proxy: Callable[[Any], Any],
    connect: Callable[..., Connection],
) -> None:  # fmt: skip
    """RST after the server ran the fetch (BRPOP for kombu): the reply never arrives."""
    plugin(on)
    proxy = reset_proxy(private_redis)
    direct = private_redis.client()
    publish(connect(private_redis.url()), 1)
    proxy.arm(rb"EVALSHA" if on else rb"BRPOP", when="after")
    worker = connect(proxy.url())
    with pytest.raises(worker.connection_errors):
        deliver(worker)
    assert proxy.resets == 1
    assert direct.llen(QUEUE) == 0  # Redis did take it off the list
    if not on:
        assert direct.hlen("unacked") == 0  # ... and recorded it nowhere: lost
        return
    assert direct.hlen("unacked") == 1 and len(held(direct)) == 1
    worker.release()  # the worker's consumer closes the broken connection
    sweeper = reclaimer(private_redis.url())
    sweeper.tick()
    assert direct.llen(QUEUE) == 0, "reclaimed on the first pass: too early to be sure"
    sweeper.tick()
    assert (direct.llen(QUEUE), direct.hlen("unacked"), held(direct)) == (1, 0, {})
    again = deliver(connect(private_redis.url()))
    assert again.decode() == {"n": 1} and again.headers["redelivered"] is True


def test_an_unreadable_message_goes_to_quarantine(
    connect: Callable[..., Connection], client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """kombu would pop it and fail to decode it: lost. The fetch keeps it aside."""
    plugin(True)
    conn = connect()
    client.lpush(QUEUE, b"not json")
    publish(conn, 2)
    assert deliver(conn).decode() == {"n": 2}
    assert client.lrange("resilience.quarantine", 0, -1) == [b"not json"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("moved to the quarantine queue" in w for w in warnings)


def test_a_no_ack_consumer_leaves_no_record(
    connect: Callable[..., Connection], client: redis.Redis
) -> None:
    plugin(True)
    conn = connect()
    publish(conn, 1)
    assert deliver(conn, no_ack=True).decode() == {"n": 1}
    assert (client.hlen("unacked"), client.zcard("unacked_index"), held(client)) == (0, 0, {})


def test_global_keyprefix_prefixes_every_key(
    connect: Callable[..., Connection], client: redis.Redis
) -> None:
    plugin(True)
    conn = connect(global_keyprefix="tenant:")
    publish(conn, 1)
    message = deliver(conn)
    assert client.hexists("tenant:unacked", message.delivery_tag)
    assert client.hexists("tenant:" + inflight.held_key(), message.delivery_tag)
    message.ack()
    ours = [k for k in client.keys("*") if b"unacked" in k or b"resilience" in k]
    assert ours == [b"tenant:resilience.owners"], "records left, or keys without the prefix"


def test_fetch_steps_aside_when_redis_refuses_scripts(
    opened: list[Connection], caplog: pytest.LogCaptureFixture
) -> None:
    plugin(True)
    with RedisServer(extra_args=("--rename-command", "SCRIPT", "")) as server:
        conn = Connection(server.url())
        opened.append(conn)
        publish(conn, 1)
        assert deliver(conn).decode() == {"n": 1}  # kombu's BRPOP took over
        assert conn.default_channel.__dict__["_resilience_fetch"] is False
        conn.release()
    warnings = [r.getMessage() for r in caplog.records if "atomic fetch off" in r.getMessage()]
    assert len(warnings) == 1


# -- leases: the visibility sweep leaves held messages alone ---------------------------------


@pytest.mark.parametrize("on", [True, False], ids=["leases", "control"])
def test_a_held_message_outlives_the_visibility_timeout(
    on: bool, redis_url: str, connect: Callable[..., Connection], client: redis.Redis
) -> None:
    plugin(on)
    holder = connect(visibility_timeout=1)
    publish(holder, 1)
    message = deliver(holder)  # held: prefetched, waiting for its ETA, or running
    leases = reclaimer(redis_url, transport_options={"visibility_timeout": 1})
    for _ in range(8):  # 2 s: twice the visibility timeout
        time.sleep(0.25)
        if on:
            leases.tick()
    connect(visibility_timeout=1).default_channel.qos.restore_visible(num=None)
    if on:
        assert (client.llen(QUEUE), client.hlen("unacked")) == (0, 1)
        message.ack()
    else:
        assert client.llen(QUEUE) == 1  # back in the queue while held: delivered twice


# -- a dead worker's messages -----------------------------------------------------------------


def test_a_silent_workers_messages_are_recovered_once_it_is_an_orphan(
    redis_url: str, connect: Callable[..., Connection], client: redis.Redis
) -> None:
    plugin(True)
    dead = connect()
    publish(dead, 1)
    deliver(dead)
    # The worker dies: its records stay in Redis, under its name, with an old heartbeat.
    client.rename(inflight.held_key(), inflight.held_key("dead"))
    client.zadd(OWNERS_KEY, {"dead": 1.0})
    dead.default_channel.qos._delivered.clear()
    survivor = reclaimer(redis_url, orphan_timeout=1.0)
    survivor.tick()
    assert client.hlen("unacked") == 1, "judged others before seeing Redis for orphan_timeout"
    time.sleep(1.1)
    survivor.tick()
    assert (client.llen(QUEUE), client.hlen("unacked")) == (1, 0)
    assert not client.exists(inflight.held_key("dead"))
    assert client.zscore(OWNERS_KEY, "dead") is None
    assert client.zscore(OWNERS_KEY, inflight.owner()) is not None


class RunningRequest:
    """A Celery request a pool process runs (what inflight.running() reads)."""

    def __init__(self, tag: str) -> None:
        self._message = SimpleNamespace(delivery_tag=tag)
        self.acknowledged = False


def test_a_running_message_of_a_closed_channel_waits_for_its_task(
    redis_url: str, connect: Callable[..., Connection], client: redis.Redis
) -> None:
    """Its channel is gone (a lost connection) but a pool process still runs it: no pass
    may hand it back, not even after another channel went away; once the task is gone
    without an ack (a killed child), the next pass does."""
    plugin(True)
    first = connect()
    publish(first, 1)
    tag = deliver(first).delivery_tag
    request = RunningRequest(tag)
    state.active_requests.add(request)
    try:
        first.release()
        sweeper = reclaimer(redis_url)
        sweeper.tick()
        second = connect()
        publish(second, 2)
        deliver(second)
        second.release()  # handed back at once: nothing runs it
        for _ in range(3):
            sweeper.tick()
        assert client.llen(QUEUE) == 1 and record(client, tag) is not None
    finally:
        state.active_requests.discard(request)
    del request
    sweeper.tick()
    assert client.llen(QUEUE) == 2 and record(client, tag) is None


class _Deadlock(Exception):
    pass


class _PlainLock:
    """The non-reentrant lock the registry had, failing instead of hanging for ever."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        if not self._lock.acquire(timeout=2):
            raise _Deadlock("the registry lock is held by the thread that wants it")

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


@pytest.mark.parametrize("reentrant", [True, False], ids=["fix", "control"])
def test_a_qos_collected_while_the_registry_is_locked_restores_its_messages(
    reentrant: bool, monkeypatch: pytest.MonkeyPatch, connect: Callable[..., Connection],
    client: redis.Redis,
) -> None:  # fmt: skip
    """kombu's QoS restores its deliveries when the garbage collector finalizes it, in
    whichever thread the collection runs, at any allocation, e.g. one the reclaimer makes
    while it holds the registry lock. With a plain lock that thread waited on itself: the
    worker hung with the message in neither its queue nor a pool process (seen 1 run in
    3 of the prefetch restart test on Celery 5.3)."""
    plugin(True)
    if not reentrant:
        monkeypatch.setattr(inflight._registry, "lock", _PlainLock())
    conn = connect()
    publish(conn, 1)
    qos = deliver(conn).channel.qos
    assert client.llen(QUEUE) == 0
    with inflight._registry.lock:  # the reclaimer, mid-pass, when the collection runs
        if reentrant:
            qos._on_collect()  # the finalizer weakref.finalize would call
        else:
            with pytest.raises(_Deadlock):
                qos._on_collect()
    assert client.llen(QUEUE) == (1 if reentrant else 0)


def test_the_reclaimer_leaves_a_close_time_restore_under_way_alone(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, connect: Callable[..., Connection],
    client: redis.Redis,
) -> None:  # fmt: skip
    """A closing channel restores its deliveries one by one (seconds for 10 000). Passes
    of the reclaimer meanwhile took the entries not yet restored for lost replies and
    restored them too: each message was restored twice over (no duplicate: the second
    found no record), and a warm shutdown took twice as long."""
    plugin(True)
    conn = connect()
    publish(conn, 1)
    publish(conn, 2)
    tags = sorted(str(deliver(conn).delivery_tag) for _ in range(2))
    sweeper = reclaimer(redis_url)
    sweeper.tick()
    calls: list[str] = []
    original = inflight.restore_one

    def restore_one(qos: Any, tag: str, *args: Any, **kwargs: Any) -> None:
        calls.append(tag)
        if len(calls) == 1:  # the close-time restore has begun: two passes run now
            sweeper.tick()
            sweeper.tick()
        original(qos, tag, *args, **kwargs)

    monkeypatch.setattr(inflight, "restore_one", restore_one)
    conn.release()
    assert sorted(calls) == tags
    assert client.llen(QUEUE) == 2 and client.hlen("unacked") == 0
    sweeper.tick()
    assert sorted(calls) == tags and not held(client)


def test_leases_are_renewed_at_once_on_a_restarted_redis(
    private_redis: RedisServer, connect: Callable[..., Connection]
) -> None:
    """Between two renewals (a third of the visibility timeout) a lease is not rewritten,
    except when Redis restarted: its dump holds the scores it had when it saved."""
    plugin(True)
    url = private_redis.url(0)
    client = private_redis.client()
    holder = connect(url)
    publish(holder, 1)
    tag = str(deliver(holder).delivery_tag)
    leases = reclaimer(url)
    leases.tick()  # the first pass renews
    client.zadd("unacked_index", {tag: 1.0})  # what a dump saved long ago would hold
    leases.tick()
    assert client.zscore("unacked_index", tag) == 1.0  # not due: left alone
    private_redis.restart(save=True)
    for _ in range(3):  # the first pass after the restart may meet the dead socket
        try:
            leases.tick()
            break
        except redis.ConnectionError:
            continue
    assert client.zscore("unacked_index", tag) > time.time() - 60
