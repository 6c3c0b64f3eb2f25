"""What the plugin's channel keeps across a lost connection, and that it changes only the
app that installed it (two apps side by side in one process)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import redis
from celery import Celery
from kombu import Connection
from kombu.transport import redis as kombu_redis

from celery_resilience import install, routing
from celery_resilience.plugin import plugin_of
from celery_resilience.redis import Transport, keys
from celery_resilience.worker.ledger import Ledger
from tests.bench.redis_server import RedisServer
from tests.conftest import PluginArm
from tests.integration.redis.test_fetch import deliver, publish

pytestmark = pytest.mark.integration
QUEUE = "work"


@pytest.mark.parametrize("on", [True, False], ids=["kept", "control"])
def test_a_channel_of_a_collected_connection_still_knows_where_redis_is(
    on: bool, plugin_arm: Callable[..., PluginArm], private_redis: RedisServer
) -> None:
    """Celery collects a lost connection (the transport's client goes, the channels close);
    a restore at close or the ack of a task that outlived it then builds a new pool from
    ``None``: "Unrecoverable error: AttributeError: 'NoneType' object has no attribute
    'hostname'" killed a Celery 5.7 worker on every Redis restart (the worker-level test:
    tests/integration/test_redis_restarts.py)."""
    url = private_redis.url(3)
    conn = plugin_arm(url).connect() if on else Connection(url)
    channel = conn.channel()
    channel.client.ping()
    conn.collect()
    assert channel.connection is None
    if on:
        params = channel._connparams()
        assert (params["host"], params["port"], params["db"]) == (
            "127.0.0.1",
            private_redis.port,
            3,
        )
        assert redis.Redis(connection_pool=redis.ConnectionPool(**params)).ping()
    else:
        with pytest.raises(AttributeError, match="NoneType"):
            channel._connparams()


def test_two_apps_in_one_process_each_on_its_own_transport(
    private_redis: RedisServer, reset_proxy: Callable[[Any], Any]
) -> None:
    """The app that installed the plugin stamps and fetches atomically; the other one is
    plain kombu: its message is lost to a reply reset after Redis ran the BRPOP."""
    proxy = reset_proxy(private_redis)
    plugin_app = Celery("plugin", broker=proxy.url(), set_as_current=False)
    plain_app = Celery("plain", broker=proxy.url(), set_as_current=False)
    install(plugin_app, keepalive=False)
    plugin = plugin_of(plugin_app)
    assert plugin is not None and plugin_of(plain_app) is None
    plugin.ledger = Ledger("side")
    with plugin_app.connection_for_write() as ours, plain_app.connection_for_write() as theirs:
        assert issubclass(ours.transport_cls, Transport) and ours.transport.plugin is plugin
        assert type(theirs.transport) is kombu_redis.Transport
        assert str(ours.as_uri()).startswith("redis://")
        direct = private_redis.client()
        for n, conn in enumerate((ours, theirs)):
            publish(conn, n, queue=f"q{n}")
        stamped = [routing.QUEUE_HEADER in direct.lindex(f"q{n}", 0).decode() for n in (0, 1)]
        assert stamped == [False, False], "no task header: a plain kombu message is not stamped"
        for n, (conn, command) in enumerate(((ours, rb"EVALSHA"), (theirs, rb"BRPOP"))):
            proxy.arm(command, when="after")
            with pytest.raises(conn.connection_errors):
                deliver(conn, f"q{n}")
        owner = keys.inflight(plugin.ledger.owner)
        assert (direct.llen("q0"), direct.llen("q1")) == (0, 0)  # Redis took both...
        assert direct.hlen("unacked") == 1 and direct.hlen(owner) == 1  # ...recorded ours only
