"""Self-tests of the test bench (tests/bench): servers, fault proxy, workers, fixtures.

If these fail, no other integration test result can be trusted.
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import redis
from celery import Celery

from tests.bench import (
    PreforkWorker,
    RedisServer,
    ResetProxy,
    free_port,
    inprocess_worker,
    no_retry_client,
    pid_alive,
    redis_server_binary,
    session_redis_url,
)
from tests.bench import redis_server as redis_server_module

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent
TINYAPP = "tests.bench.tinyapp"
GET = rb"\$3\r\nGET\r\n"  # the bulk string "GET" exactly, not GETEX/GETSET
INCR = rb"\$6\r\nINCRBY\r\n"  # redis-py sends INCR as INCRBY key 1


@pytest.fixture
def producer() -> Iterator[Callable[[str], Celery]]:
    """Factory for client-side Celery apps (not set as current), closed at teardown."""
    apps: list[Celery] = []

    def make(url: str) -> Celery:
        app = Celery("producer", broker=url, backend=url, set_as_current=False)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


# -- redis_server.py --------------------------------------------------------------------------


def test_free_port_is_below_ephemeral_range_and_never_repeats() -> None:
    ports = [free_port() for _ in range(50)]
    assert all(20000 <= port < 32768 for port in ports)
    assert len(set(ports)) == 50


def test_session_server_answers_ping(redis_server: Any, redis_url: str) -> None:
    client = no_retry_client(redis_url)
    assert client.ping() is True
    assert client.dbsize() == 0  # redis_url flushes at test start
    assert redis_url == redis_server.url(0)


def test_private_server_starts_and_answers_ping(private_redis: RedisServer) -> None:
    assert private_redis.is_running and private_redis.pid is not None
    assert pid_alive(private_redis.pid)
    assert private_redis.url(3) == f"redis://127.0.0.1:{private_redis.port}/3"
    assert private_redis.client().ping() is True
    config = private_redis.client().config_get("*")
    assert config["save"] == "" and config["appendonly"] == "no"
    assert config["tcp-keepalive"] == "0"


def test_stop_is_idempotent_and_leaves_nothing() -> None:
    server = RedisServer().start()
    pid = server.pid
    assert pid is not None
    server.stop()
    server.stop()
    assert not pid_alive(pid) and not server.is_running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    server.close()
    assert not os.path.exists(server.dir)


def test_restart_with_save_keeps_data_and_is_down_meanwhile(private_redis: RedisServer) -> None:
    private_redis.client().set("kept", "yes")
    port = private_redis.port
    # Restart from a helper thread that then exits: PDEATHSIG must not kill the new server.
    restarter = threading.Thread(target=private_redis.restart, kwargs={"down_for": 1.0})
    started = time.monotonic()
    restarter.start()
    _wait_until_down(private_redis)
    with pytest.raises(redis.ConnectionError):
        private_redis.client().ping()
    restarter.join(10)
    assert time.monotonic() - started >= 1.0
    assert private_redis.port == port and private_redis.restarts == 1
    assert private_redis.client().get("kept") == b"yes"
    time.sleep(0.2)  # the helper thread is gone now
    assert private_redis.is_running and private_redis.client().ping() is True


def _wait_until_down(server: RedisServer, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            server.client(socket_connect_timeout=0.2).ping()
        except redis.ConnectionError:
            return
        time.sleep(0.01)
    raise AssertionError("server never went down")


def test_restart_without_save_comes_back_empty(private_redis: RedisServer) -> None:
    private_redis.client().set("first", "1")
    private_redis.restart(save=True)  # leaves a dump.rdb behind ...
    assert os.path.exists(os.path.join(private_redis.dir, "dump.rdb"))
    private_redis.client().set("second", "2")
    private_redis.restart(save=False)  # ... which NOSAVE must not resurrect
    assert private_redis.client().dbsize() == 0
    assert not os.path.exists(os.path.join(private_redis.dir, "dump.rdb"))


def test_session_redis_url_prefers_a_local_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example.invalid:6390/0")
    assert redis_server_binary()
    assert session_redis_url() is None
    monkeypatch.setattr(redis_server_module, "_find_redis_server_binary", lambda: None)
    assert session_redis_url() == "redis://example.invalid:6390/0"


# -- proxy.py ---------------------------------------------------------------------------------


def test_proxy_reset_before_forwarding(
    private_redis: RedisServer, reset_proxy: Callable[[Any], ResetProxy]
) -> None:
    proxy = reset_proxy(private_redis)
    direct = private_redis.client()
    direct.set("k", "v")
    direct.config_resetstat()
    client = proxy.client()
    proxy.arm(GET, nth=3, when="before")
    assert client.get("k") == b"v"
    assert client.get("k") == b"v"
    with pytest.raises(redis.ConnectionError, match="Connection reset by peer"):
        client.get("k")
    assert _get_calls(direct) == 2  # the 3rd GET never reached the server
    assert (proxy.matches, proxy.resets, proxy.connections) == (3, 1, 1)
    # A new connection works, and the 4th match (times=1) passes untouched.
    assert client.get("k") == b"v"
    assert (proxy.matches, proxy.resets, proxy.connections) == (4, 1, 2)
    assert _get_calls(direct) == 3
    assert len(proxy.events) == 1 and "before forwarding" in proxy.events[0]


def _get_calls(direct: redis.Redis) -> int:
    return int(direct.info("commandstats")["cmdstat_get"]["calls"])


def test_proxy_reset_after_reply_applies_command_once(
    private_redis: RedisServer, reset_proxy: Callable[[Any], ResetProxy]
) -> None:
    proxy = reset_proxy(private_redis)
    client = proxy.client()
    proxy.arm(INCR, when="after")
    with pytest.raises(redis.ConnectionError, match="Connection reset by peer"):
        client.incr("n")
    assert private_redis.client().get("n") == b"1"  # applied exactly once
    assert client.incr("n") == 2  # a retry is a second increment
    assert (proxy.matches, proxy.resets) == (2, 1)


def test_proxy_times_and_rearm(
    private_redis: RedisServer, reset_proxy: Callable[[Any], ResetProxy]
) -> None:
    proxy = reset_proxy(private_redis)
    client = proxy.client()
    proxy.arm(INCR, nth=2, times=2)
    assert client.incr("n") == 1
    for _ in range(2):
        with pytest.raises(redis.ConnectionError):
            client.incr("n")
    assert client.incr("n") == 2
    proxy.arm(INCR)  # re-arming resets the counters
    assert proxy.matches == 0
    with pytest.raises(redis.ConnectionError):
        client.incr("n")
    assert proxy.resets == 3


def test_proxy_sends_a_real_rst(
    private_redis: RedisServer, reset_proxy: Callable[[Any], ResetProxy]
) -> None:
    proxy = reset_proxy(private_redis)
    proxy.arm(rb"PING")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        with pytest.raises(ConnectionResetError):  # a FIN would read b"" instead
            sock.recv(100)


def test_proxy_reset_all(
    private_redis: RedisServer, reset_proxy: Callable[[Any], ResetProxy]
) -> None:
    proxy = reset_proxy(private_redis)
    socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(2)]
    try:
        for sock in socks:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert sock.recv(100) == b"+PONG\r\n"
        assert proxy.reset_all() == 2
        for sock in socks:
            with pytest.raises(ConnectionResetError):
                sock.recv(100)
    finally:
        for sock in socks:
            sock.close()
    assert proxy.resets == 2 and proxy.open_connections == 0
    assert proxy.client().ping() is True


def test_proxy_survives_upstream_restart(
    private_redis: RedisServer, reset_proxy: Callable[[Any], ResetProxy]
) -> None:
    proxy = reset_proxy(private_redis)
    proxy.client().set("k", "v")
    private_redis.restart()
    assert proxy.client().get("k") == b"v"


def test_proxy_stop_is_idempotent(private_redis: RedisServer) -> None:
    proxy = ResetProxy(private_redis.host, private_redis.port).start()
    assert proxy.client().ping() is True
    proxy.close()
    proxy.close()
    with pytest.raises(redis.ConnectionError):
        proxy.client().ping()


# -- workers.py -------------------------------------------------------------------------------


def test_prefork_worker_end_to_end(
    redis_url: str,
    prefork_worker: Callable[..., PreforkWorker],
    producer: Callable[[str], Celery],
) -> None:
    worker = prefork_worker(TINYAPP, env={"BENCH_BROKER_URL": redis_url}, cwd=str(ROOT))
    app = producer(redis_url)
    assert app.send_task("bench.add", args=(2, 3)).get(timeout=20) == 5
    child = app.send_task("bench.pid").get(timeout=20)
    main = worker.pid
    assert main is not None
    members = worker.group_pids()
    assert main in members and child in members and child != main
    assert len(members) == 3  # main process + concurrency=2 pool children
    rc = worker.stop()  # SIGTERM: warm shutdown, clean exit
    assert rc == 0, f"warm shutdown ended rc={rc}; worker log tail:\n{worker.log[-6000:]}"
    assert "Warm shutdown" in worker.log
    assert not any(pid_alive(pid) for pid in members)
    with pytest.raises(ProcessLookupError):
        os.kill(main, 0)
    assert worker.stop() == 0  # idempotent


def test_prefork_worker_kill_leaves_nothing(
    redis_url: str, prefork_worker: Callable[..., PreforkWorker]
) -> None:
    worker = prefork_worker(TINYAPP, env={"BENCH_BROKER_URL": redis_url}, cwd=str(ROOT))
    members = worker.group_pids()
    assert len(members) == 3
    assert worker.kill() == -9
    assert not any(pid_alive(pid) for pid in members)


def test_prefork_worker_stop_timeout_dumps_stacks_then_kills(
    redis_url: str,
    prefork_worker: Callable[..., PreforkWorker],
    producer: Callable[[str], Celery],
) -> None:
    worker = prefork_worker(TINYAPP, env={"BENCH_BROKER_URL": redis_url}, cwd=str(ROOT))
    app = producer(redis_url)
    app.send_task("bench.sleep", args=(120,))
    worker.wait_for_log(r"Task bench\.sleep\[.*\] received")
    members = worker.group_pids()
    # A warm shutdown waits for the running task, so this one cannot finish in 3 s.
    assert worker.stop(timeout=3.0) == -9
    # Celery's SIGUSR1 "cry" dump, written before the kill: the main thread's stack.
    assert "MainThread\n" + "=" * 49 + "\n" in worker.log
    assert "LOCAL VARIABLES" in worker.log
    assert not any(pid_alive(pid) for pid in members)


def test_prefork_worker_start_failure_shows_log(redis_url: str) -> None:
    worker = PreforkWorker("tests.bench.no_such_module", cwd=str(ROOT))
    try:
        with pytest.raises(RuntimeError, match="no_such_module"):
            worker.start(timeout=30)
        assert not worker.alive
    finally:
        worker.close()


def test_inprocess_worker_runs_tasks_back_to_back(redis_url: str) -> None:
    app = Celery("inproc", broker=redis_url, backend=redis_url, set_as_current=False)

    @app.task(name="inproc.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    try:
        assert gc.isenabled()
        with inprocess_worker(app, queues=["bench-q"]):
            assert not gc.isenabled()  # celery#10477 workaround
            assert mul.apply_async((6, 7), queue="bench-q").get(timeout=10) == 42
        assert gc.isenabled()
        # A second worker in the same process must still run ETA tasks (celery 5.3 pitfall).
        with inprocess_worker(app):
            assert mul.apply_async((2, 5), countdown=0.5).get(timeout=10) == 10
    finally:
        app.close()


def test_classic_celery_worker_fixture(
    celery_app: Celery, celery_worker: Any, redis_url: str
) -> None:
    from celery.contrib.testing.worker import TestWorkController

    assert isinstance(celery_worker, TestWorkController)  # in-process, not pytest-celery's Docker
    assert celery_app.conf.broker_url == redis_url

    @celery_app.task(name="classic.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    celery_worker.reload()  # tasks registered after start need fresh consumer strategies
    assert mul.delay(4, 4).get(timeout=10) == 16


def test_docker_fixtures_fail_fast(request: pytest.FixtureRequest) -> None:
    with pytest.raises(pytest.fail.Exception, match="Docker-based pytest-celery fixture"):
        request.getfixturevalue("docker_client")
