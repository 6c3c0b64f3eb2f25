"""The heal: a connection that idled on a socket the kernel closed reconnects before it writes.

Real redis-server. The server closes the connection (CLIENT KILL: a FIN, our side goes to
CLOSE_WAIT); keepalive's abort leaves the socket closed too (tests/integration/test_firewall.py
does that one end to end). Bare connections, no pool and no client retries, so nothing but
the heal can save the write: the control, with the heal off, fails the same command.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio
import redis.connection

from celery_resilience import keepalive
from celery_resilience.sockets import hooks
from tests.bench.jobapp import wait_until
from tests.bench.redis_server import RedisServer

pytestmark = pytest.mark.integration
HEALED = "the kernel closed the idle socket"


@pytest.fixture(autouse=True)
def _no_idle_threshold(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The heal waits for a second of idleness (keepalive cannot abort a busier socket);
    # the threshold is not what these tests are about.
    monkeypatch.setattr(hooks, "_HEAL_AFTER_IDLE", 0.0)
    yield


def _kill(server: RedisServer, client_id: int) -> None:
    assert server.client().client_kill_filter(_id=client_id) == 1


@pytest.mark.parametrize("heal", [True, False], ids=["heal", "control-no-heal"])
def test_a_sync_connection_reconnects_before_writing_to_a_closed_socket(
    private_redis: RedisServer, heal: bool, caplog: pytest.LogCaptureFixture
) -> None:
    keepalive.enable(lambda: None, heal=heal)
    conn = redis.connection.Connection(host="127.0.0.1", port=private_redis.port)
    try:
        conn.send_command("CLIENT", "ID")
        _kill(private_redis, conn.read_response())
        assert wait_until(lambda: hooks._aborted(conn._sock), timeout=5)
        with caplog.at_level(logging.WARNING, "celery_resilience"):
            if heal:
                conn.send_command("INCR", "healed")
                assert conn.read_response() == 1
            else:
                with pytest.raises(redis.ConnectionError):
                    conn.send_command("INCR", "healed")
                    conn.read_response()
    finally:
        conn.disconnect()
    assert private_redis.client().get("healed") == (b"1" if heal else None)  # written once
    assert caplog.text.count(HEALED) == (1 if heal else 0)


@pytest.mark.parametrize("loop_ran", [False, True], ids=["loop-stopped", "loop-polled"])
@pytest.mark.parametrize("heal", [True, False], ids=["heal", "control-no-heal"])
def test_an_asyncio_connection_reconnects_before_writing_to_a_closed_socket(
    private_redis: RedisServer, heal: bool, loop_ran: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Like the census app's client: a loop the thread keeps, run once per job.

    ``loop-stopped``: the loop does not run between jobs, so the transport learns of the
    close only inside the next write (on Python 3.12.1 with redis-py 4.6 that write raises
    AttributeError '_add_writer'). ``loop-polled``: it ran, the transport is already closed.
    """
    keepalive.enable(lambda: None, heal=heal)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # Python 3.9: redis.asyncio binds the current loop
    conn = redis.asyncio.Connection(host="127.0.0.1", port=private_redis.port)

    async def command(*args: object) -> object:
        await conn.send_command(*args)
        return await conn.read_response()

    try:
        _kill(private_redis, loop.run_until_complete(command("CLIENT", "ID")))
        assert wait_until(lambda: hooks._aborted(hooks.async_socket(conn)), timeout=5)
        if loop_ran:
            loop.run_until_complete(asyncio.sleep(0.1))
        with caplog.at_level(logging.WARNING, "celery_resilience"):
            if heal:
                assert loop.run_until_complete(command("INCR", "healed")) == 1
            else:
                broken = (redis.ConnectionError, AttributeError)  # AttributeError: see above
                with pytest.raises(broken):
                    loop.run_until_complete(command("INCR", "healed"))
    finally:
        loop.run_until_complete(conn.disconnect())
        loop.close()
        asyncio.set_event_loop(None)
    assert private_redis.client().get("healed") == (b"1" if heal else None)  # written once
    assert caplog.text.count(HEALED) == (1 if heal else 0)


def test_a_healthy_idle_connection_is_not_reconnected(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    keepalive.enable(lambda: None, heal=True)
    conn = redis.connection.Connection(host="127.0.0.1", port=private_redis.port)
    try:
        ids = []
        with caplog.at_level(logging.WARNING, "celery_resilience"):
            for _ in range(3):
                conn.send_command("CLIENT", "ID")
                ids.append(conn.read_response())
    finally:
        conn.disconnect()
    assert len(set(ids)) == 1 and HEALED not in caplog.text
