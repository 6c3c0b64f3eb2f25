"""The atomic fetch and the reclaimer on the plugin's Redis channel, in this process.

Every "fixed" test has a control on kombu's own transport (or, where noted, shows the
cause of the bug on a real server). Worker-level tests (prefork workers, Redis restarts)
are in test_redis_restarts.py.
"""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import redis
from celery.worker import state
from kombu import Connection, Consumer, Producer, Queue
from kombu.utils.json import loads

from celery_resilience.redis import keys, restore
from tests.bench.redis_server import RedisServer
from tests.conftest import PluginArm

pytestmark = pytest.mark.integration
QUEUE = "work"
Arm = Callable[..., PluginArm]


@pytest.fixture
def client(redis_url: str) -> Any:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def consumer_conn(on: bool, arm: Arm, url: str | None = None, **options: Any) -> Connection:
    """A connection on the plugin's transport (a worker's) or on kombu's own."""
    if on:
        return arm(url).connect(**options)
    return Connection(url or arm().url, transport_options=options)


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


def held(client: redis.Redis, owner: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.inflight(owner)).items()}


def record(client: redis.Redis, tag: str) -> Any:
    raw = client.hget("unacked", tag)
    return loads(raw) if raw is not None else None


# -- what a fetch writes ----------------------------------------------------------------------


@pytest.mark.parametrize("on", [True, False], ids=["fetch", "control"])
def test_a_fetch_records_exactly_what_kombu_records(
    on: bool, plugin_arm: Arm, client: redis.Redis
) -> None:
    conn = consumer_conn(on, plugin_arm)
    publish(conn, 1)
    message = deliver(conn)
    tag = message.delivery_tag
    assert record(client, tag) == [message._raw, "", QUEUE]
    assert client.zscore("unacked_index", tag) is not None
    channel = conn.default_channel
    if on:
        assert held(client, channel.ledger().owner) == {tag: channel._chan_id}
    else:
        assert not list(client.scan_iter("resilience.inflight.*"))
    message.ack()
    assert (client.hlen("unacked"), client.zcard("unacked_index")) == (0, 0)
    assert not list(client.scan_iter("resilience.inflight.*"))


def test_fetch_takes_the_lists_in_kombus_order(plugin_arm: Arm) -> None:
    """Priority lists first to last, as BRPOP does; then the idle wait wakes on a push."""
    conn = plugin_arm().connect(priority_steps=[0, 3, 6, 9])
    for n, priority in ((1, 9), (2, 0), (3, 6)):
        Producer(conn.default_channel).publish(
            {"n": n}, routing_key=QUEUE, declare=[Queue(QUEUE)], priority=priority,
            serializer="json",
        )  # fmt: skip
    bodies = [deliver(conn).decode()["n"] for _ in range(3)]
    assert bodies == [2, 3, 1]
    assert conn.default_channel.fetch_state().last_key == f"{QUEUE}\x06\x169"


# -- the window between taking a message and recording it ------------------------------------


@pytest.mark.fault
@pytest.mark.parametrize("on", [True, False], ids=["fetch", "control"])
def test_a_reply_lost_after_redis_took_the_message_loses_nothing(
    on: bool, private_redis: RedisServer, reset_proxy: Callable[[Any], Any], plugin_arm: Arm,
    signals_seen: list[Any],
) -> None:  # fmt: skip
    """RST after the server ran the fetch (BRPOP for kombu): the reply never arrives."""
    proxy = reset_proxy(private_redis)
    direct = private_redis.client()
    publish(Connection(private_redis.url()), 1)
    proxy.arm(rb"EVALSHA" if on else rb"BRPOP", when="after")
    arm = plugin_arm(private_redis.url())
    worker = arm.connect(proxy.url()) if on else Connection(proxy.url())
    with pytest.raises(worker.connection_errors):
        deliver(worker)
    assert proxy.resets == 1
    assert direct.llen(QUEUE) == 0  # Redis did take it off the list
    if not on:
        assert direct.hlen("unacked") == 0  # ... and recorded it nowhere: lost
        return
    assert direct.hlen("unacked") == 1 and len(held(direct, arm.ledger.owner)) == 1
    worker.release()  # the worker's consumer closes the broken connection
    sweeper = arm.reclaimer()
    sweeper.tick()
    assert direct.llen(QUEUE) == 0, "reclaimed on the first pass: too early to be sure"
    sweeper.tick()
    assert (direct.llen(QUEUE), direct.hlen("unacked"), held(direct, arm.ledger.owner)) == (
        1, 0, {},
    )  # fmt: skip
    restored = [kw for name, _, kw in signals_seen if name == "message_restored"]
    assert restored == [{"task_id": None, "queue": QUEUE, "priority": 0,
                         "reason": restore.LOST_FETCH_REPLY}]  # fmt: skip
    again = deliver(Connection(private_redis.url()))
    assert again.decode() == {"n": 1} and again.headers["redelivered"] is True


def test_an_unreadable_message_goes_to_quarantine(
    plugin_arm: Arm, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """kombu would pop it and fail to decode it: lost. The fetch keeps it aside."""
    conn = plugin_arm().connect()
    client.lpush(QUEUE, b"not json")
    publish(conn, 2)
    assert deliver(conn).decode() == {"n": 2}
    assert client.lrange("resilience.quarantine", 0, -1) == [b"not json"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("moved to the quarantine queue" in w for w in warnings)


def test_a_no_ack_consumer_leaves_no_record(plugin_arm: Arm, client: redis.Redis) -> None:
    arm = plugin_arm()
    conn = arm.connect()
    publish(conn, 1)
    assert deliver(conn, no_ack=True).decode() == {"n": 1}
    assert (client.hlen("unacked"), client.zcard("unacked_index")) == (0, 0)
    assert held(client, arm.ledger.owner) == {}


def test_global_keyprefix_prefixes_every_key(plugin_arm: Arm, client: redis.Redis) -> None:
    arm = plugin_arm()
    conn = arm.connect(global_keyprefix="tenant:")
    publish(conn, 1)
    message = deliver(conn)
    assert client.hexists("tenant:unacked", message.delivery_tag)
    assert client.hexists("tenant:" + keys.inflight(arm.ledger.owner), message.delivery_tag)
    message.ack()
    ours = [k for k in client.keys("*") if b"unacked" in k or b"resilience" in k]
    assert ours == [b"tenant:resilience.owners"], "records left, or keys without the prefix"


def test_fetch_steps_aside_when_redis_refuses_scripts(
    plugin_arm: Arm, caplog: pytest.LogCaptureFixture
) -> None:
    with RedisServer(extra_args=("--rename-command", "SCRIPT", "")) as server:
        conn = plugin_arm(server.url()).connect()
        publish(conn, 1)
        assert deliver(conn).decode() == {"n": 1}  # kombu's BRPOP took over
        assert conn.default_channel.fetch_state() is None
        conn.release()
    warnings = [r.getMessage() for r in caplog.records if "atomic fetch off" in r.getMessage()]
    assert len(warnings) == 1


def test_a_flushed_script_cache_is_loaded_again_and_the_fetch_stays_on(
    plugin_arm: Arm, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """SCRIPT FLUSH (what a restart or a failover to a node without the script does): the
    next fetch meets NOSCRIPT, loads the script again and goes on fetching atomically."""
    caplog.set_level(logging.INFO, "celery_resilience")
    arm = plugin_arm()
    conn = arm.connect()
    publish(conn, 1)
    deliver(conn).ack()
    client.script_flush()
    for n in (2, 3):
        publish(conn, n)
        message = deliver(conn)
        assert held(client, arm.ledger.owner) == {
            message.delivery_tag: conn.default_channel._chan_id
        }
        message.ack()
    assert conn.default_channel.fetch_state() is not None
    reloads = [r for r in caplog.records if "loaded it again" in r.getMessage()]
    assert len(reloads) == 1 and "atomic fetch off" not in caplog.text


def test_redis_py_names_a_flushed_script_by_class_not_by_the_word_noscript(
    client: redis.Redis,
) -> None:
    """Why the fetch once turned itself off for good: it looked for "NOSCRIPT" in the
    error's text, and redis-py's NoScriptError does not carry it."""
    sha = client.script_load("return 1")
    client.script_flush()
    with pytest.raises(redis.exceptions.NoScriptError) as caught:
        client.evalsha(sha, 0)
    assert "NOSCRIPT" not in str(caught.value)


# -- leases: the visibility sweep leaves held messages alone ---------------------------------


@pytest.mark.parametrize("on", [True, False], ids=["leases", "control"])
def test_a_held_message_outlives_the_visibility_timeout(
    on: bool, plugin_arm: Arm, client: redis.Redis
) -> None:
    arm = plugin_arm()
    holder = arm.connect(visibility_timeout=1) if on else consumer_conn(False, plugin_arm,
                                                                        visibility_timeout=1)  # fmt: skip
    publish(holder, 1)
    message = deliver(holder)  # held: prefetched, waiting for its ETA, or running
    leases = arm.reclaimer(visibility_timeout=1)
    for _ in range(8):  # 2 s: twice the visibility timeout
        time.sleep(0.25)
        if on:
            leases.tick()
    Connection(
        arm.url, transport_options={"visibility_timeout": 1}
    ).default_channel.qos.restore_visible(num=None)
    if on:
        assert (client.llen(QUEUE), client.hlen("unacked")) == (0, 1)
        message.ack()
    else:
        assert client.llen(QUEUE) == 1  # back in the queue while held: delivered twice


# -- a dead worker's messages -----------------------------------------------------------------


def test_a_silent_workers_messages_are_recovered_once_it_is_an_orphan(
    plugin_arm: Arm, client: redis.Redis, signals_seen: list[Any]
) -> None:
    dead = plugin_arm()
    conn = dead.connect()
    publish(conn, 1)
    deliver(conn)
    # The worker dies: its records stay in Redis, under its name, with an old heartbeat.
    client.zadd(keys.OWNERS, {dead.ledger.owner: 1.0})
    conn.default_channel.qos._delivered.clear()
    survivor = plugin_arm(fetch_orphan_timeout=1.0, fetch_heartbeat=0.3)
    sweeper = survivor.reclaimer()
    sweeper.tick()
    assert client.hlen("unacked") == 1, "judged others before seeing Redis for orphan_timeout"
    time.sleep(1.1)
    sweeper.tick()
    assert (client.llen(QUEUE), client.hlen("unacked")) == (1, 0)
    assert not client.exists(keys.inflight(dead.ledger.owner))
    assert client.zscore(keys.OWNERS, dead.ledger.owner) is None
    assert client.zscore(keys.OWNERS, survivor.ledger.owner) is not None
    reasons = [kw["reason"] for name, _, kw in signals_seen if name == "message_restored"]
    assert reasons == [restore.DEAD_WORKER]


class RunningRequest:
    """A Celery request a pool process runs (what worker/running.py reads)."""

    def __init__(self, tag: str) -> None:
        self._message = SimpleNamespace(delivery_tag=tag)
        self.acknowledged = False


def test_a_running_message_of_a_closed_channel_waits_for_its_task(
    plugin_arm: Arm, client: redis.Redis
) -> None:
    """Its channel is gone (a lost connection) but a pool process still runs it: no pass
    may hand it back, not even after another channel went away; once the task is gone
    without an ack (a killed child), the next pass does."""
    arm = plugin_arm()
    first = arm.connect()
    publish(first, 1)
    tag = deliver(first).delivery_tag
    request = RunningRequest(tag)
    state.active_requests.add(request)
    try:
        first.release()
        sweeper = arm.reclaimer()
        sweeper.tick()
        second = arm.connect()
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
    """A non-reentrant lock, failing instead of hanging for ever."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        if not self._lock.acquire(timeout=2):
            raise _Deadlock("the ledger's lock is held by the thread that wants it")

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


@pytest.mark.parametrize("reentrant", [True, False], ids=["fix", "control"])
def test_a_qos_collected_while_the_ledger_is_locked_restores_its_messages(
    reentrant: bool, plugin_arm: Arm, client: redis.Redis
) -> None:
    """kombu's QoS restores its deliveries when the garbage collector finalizes it, in
    whichever thread the collection runs, at any allocation, e.g. one the reclaimer makes
    while it holds the ledger's lock. With a plain lock that thread waited on itself: the
    worker hung with the message in neither its queue nor a pool process (seen 1 run in
    3 of the prefetch restart test on Celery 5.3)."""
    arm = plugin_arm()
    if not reentrant:
        arm.ledger.lock = _PlainLock()  # type: ignore[assignment]
    conn = arm.connect()
    publish(conn, 1)
    qos = deliver(conn).channel.qos
    assert client.llen(QUEUE) == 0
    with arm.ledger.lock:  # the reclaimer, mid-pass, when the collection runs
        if reentrant:
            qos._on_collect()  # the finalizer weakref.finalize would call
        else:
            with pytest.raises(_Deadlock):
                qos._on_collect()
    assert client.llen(QUEUE) == (1 if reentrant else 0)


def test_the_reclaimer_leaves_a_close_time_restore_under_way_alone(
    monkeypatch: pytest.MonkeyPatch, plugin_arm: Arm, client: redis.Redis
) -> None:
    """A closing channel restores its deliveries one by one (seconds for 10 000). Passes
    of the reclaimer meanwhile took the entries not yet restored for lost replies and
    restored them too: each message was restored twice over (no duplicate: the second
    found no record), and a warm shutdown took twice as long."""
    arm = plugin_arm()
    conn = arm.connect()
    publish(conn, 1)
    publish(conn, 2)
    tags = sorted(str(deliver(conn).delivery_tag) for _ in range(2))
    sweeper = arm.reclaimer()
    sweeper.tick()
    calls: list[str] = []
    original = restore.restore

    def counted(qos: Any, tag: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(tag)
        if len(calls) == 1:  # the close-time restore has begun: two passes run now
            sweeper.tick()
            sweeper.tick()
        return original(qos, tag, *args, **kwargs)

    monkeypatch.setattr(restore, "restore", counted)
    conn.release()
    assert sorted(calls) == tags
    assert client.llen(QUEUE) == 2 and client.hlen("unacked") == 0
    sweeper.tick()
    assert sorted(calls) == tags and not held(client, arm.ledger.owner)


def test_leases_are_renewed_at_once_on_a_restarted_redis(
    private_redis: RedisServer, plugin_arm: Arm
) -> None:
    """Between two renewals (a third of the visibility timeout) a lease is not rewritten,
    except when Redis restarted: its dump holds the scores it had when it saved."""
    arm = plugin_arm(private_redis.url(0))
    client = private_redis.client()
    holder = arm.connect()
    publish(holder, 1)
    tag = str(deliver(holder).delivery_tag)
    leases = arm.reclaimer()
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
