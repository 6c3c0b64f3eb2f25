"""The consumer keeps fetching in kombu's event loop when another channel's connection goes.

kombu < 5.7 stops the loop's polling when any connection of the transport disconnects,
and redis-py disconnects a connection again when the collector frees it. So a channel
the consumer failed to open while Redis was down (kombu < 5.4), or any channel closed on
the same connection (kombu < 5.7), stops the live consumer: the worker answers inspect
and never fetches again (celery/celery#8030). Each case has its control on kombu's own
transport; where kombu has fixed a case upstream both would fetch alike, so it is skipped.
"""

from __future__ import annotations

import traceback
from typing import Any

import kombu
import pytest
from kombu import Connection, Consumer, Producer, Queue
from kombu.asynchronous import Hub
from kombu.transport import redis as kombu_redis

from tests.bench.redis_server import RedisServer
from tests.conftest import PluginArm

pytestmark = [pytest.mark.integration, pytest.mark.fault]
QUEUE = "work"
TICKS = 40  # event-loop iterations to wait for one message (each polls 0.05 s at most)
# The kombu versions whose loop stops, per case (fixed upstream by kombu#2007, #2492).
STOPS = {"never-opened": (5, 4), "closed": (5, 7), "closed-consumer": (5, 7)}


def never_opened(conn: Connection, server: RedisServer) -> Any:
    """A channel whose ping failed (Redis down), as a reconnecting consumer leaves one."""
    server.stop()
    try:
        with pytest.raises(conn.connection_errors) as failed:
            conn.channel()
    finally:
        server.start()
    found = [frame.f_locals.get("self") for frame, _ in traceback.walk_tb(failed.tb)]
    return next(c for c in found if isinstance(c, kombu_redis.Channel))


def free(channel: Any) -> None:
    """What the collector does to the channel's connections: ``Connection.__del__`` (redis-py)
    disconnects each of them once more."""
    channel.__dict__["client"].connection_pool.disconnect()


@pytest.mark.parametrize("case", ["never-opened", "closed", "closed-consumer"])
@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_a_freed_channel_does_not_stop_the_consumer_fetching(plugin: bool, case: str) -> None:
    stops = tuple(kombu.VERSION[:2]) < STOPS[case]
    if not stops:
        pytest.skip(f"kombu {kombu.__version__} has this case fixed: both legs fetch alike")
    got: list[int] = []
    with RedisServer() as server:
        arm = PluginArm(server.url()) if plugin else None
        conn = arm.connect() if arm else Connection(server.url())
        try:
            waiting = run_case(case, server, conn, got)
        finally:
            conn.release()
    print(f"\n  kombu {kombu.__version__}, {case}, plugin={plugin}: got {got}, waiting {waiting}")
    if plugin:
        assert (got, waiting) == ([1, 2], 0)
    else:  # the bug: message 2 waits in its queue and nobody fetches it
        assert (got, waiting) == ([1], 1)


def run_case(case: str, server: RedisServer, conn: Connection, got: list[int]) -> int:
    """Consume, free or close a second channel, consume again; what is left waiting."""
    producer = Producer(conn.default_channel)  # kombu's first channel: no ping
    stale = never_opened(conn, server) if case == "never-opened" else conn.channel()
    channel = conn.channel()

    def on_message(body: Any, message: Any) -> None:
        got.append(body["n"])
        message.ack()

    hub = Hub()
    hub.call_repeatedly(0.05, lambda: None)  # short polls: a tick is quick
    loop = hub.create_loop()
    try:
        Consumer(channel, [Queue(QUEUE)], callbacks=[on_message], accept=["json"]).consume()
        if case == "closed-consumer":  # its fetch is registered in the loop too
            Consumer(stale, [Queue("other")], callbacks=[on_message], accept=["json"]).consume()
        conn.register_with_event_loop(hub)

        def publish_and_tick(n: int) -> None:
            producer.publish({"n": n}, routing_key=QUEUE)
            for _ in range(TICKS):
                if n in got:
                    return
                next(loop)

        publish_and_tick(1)
        if case == "closed":
            stale.client.ping()  # a channel that has used its connection
        if case == "never-opened":
            free(stale)
        else:
            stale.close()  # disconnects its connections now
        publish_and_tick(2)
        return int(server.client().llen(QUEUE))
    finally:
        hub.close()
