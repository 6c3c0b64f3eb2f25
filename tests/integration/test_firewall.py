"""A real stateful firewall drops idle connections; keepalive keeps every one alive.

Three network namespaces (client - firewall - server, tests/bench/netns.py): the firewall
forgets an idle TCP flow after 3 s and then silently drops its packets, like a cloud
firewall after its idle timeout. The census worker runs in the client namespace; tasks
are published from the server namespace, so only the worker's connections cross the
firewall. After an idle period longer than the timeout, every task uses the result
backend, the django-redis cache and the application clients.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from celery_resilience import keepalive
from celery_resilience.sockets import hooks
from tests import upstream
from tests.bench._proc import tail
from tests.bench.jobapp import wait_until
from tests.bench.netns import Firewall, netns_available
from tests.bench.workers import PreforkWorker

pytestmark = [pytest.mark.integration, pytest.mark.fault]
REPO = str(Path(__file__).resolve().parents[2])
CONNTRACK_TIMEOUT = 3


@pytest.fixture
def firewall() -> Firewall:
    ok, reason = netns_available()
    if not ok:
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            pytest.fail(f"CI runs as root but cannot build the firewall namespaces: {reason}")
        pytest.skip(reason)
    with Firewall(conntrack_timeout=CONNTRACK_TIMEOUT) as fw:
        yield fw


class NetnsWorker(PreforkWorker):
    """A celery worker started inside one of the firewall's namespaces."""

    def __init__(self, fw: Firewall, ns: str, *args: object, **kwargs: object) -> None:
        self.fw, self.ns = fw, ns
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    @property
    def argv(self) -> list[str]:
        return self.fw.exec_prefix(self.ns) + super().argv


PUBLISH = """
import json, sys, time
from celery import Celery
url, n, task = sys.argv[1], int(sys.argv[2]), sys.argv[3]
app = Celery("publisher", broker=url + "/0", backend=url + "/1", set_as_current=False)
results = [app.send_task(task, args=(0.2,)) for _ in range(n)]
deadline = time.monotonic() + 30
ok = 0
for r in results:
    try:
        r.get(timeout=max(0.1, deadline - time.monotonic()))
        ok += 1
    except Exception as exc:
        print(repr(exc), file=sys.stderr)
print(json.dumps({"ok": ok, "failed": n - ok}))
"""


def publish(fw: Firewall, url: str, n: int, task: str = "census.touch") -> dict[str, int]:
    """Publish n tasks from the server namespace; how many finished within 30 s."""
    proc = fw.run_in("server", [sys.executable, "-c", PUBLISH, url, str(n), task],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)  # fmt: skip
    out, err = proc.communicate(timeout=120)
    lines = out.decode().strip().splitlines()
    assert lines, f"the publisher printed nothing: {err.decode()[-2000:]}"
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def worker_env(url: str, plugin: bool) -> dict[str, str]:
    return {
        "CENSUS_REDIS_URL": url,
        "CENSUS_PLUGIN": "1" if plugin else "0",
        # Keepalive must beat the 3 s conntrack timeout: probe after 1 s idle.
        "CELERY_RESILIENCE_KEEPALIVE_IDLE": "1",
        "CELERY_RESILIENCE_KEEPALIVE_INTERVAL": "1",
        "CELERY_RESILIENCE_KEEPALIVE_COUNT": "3",
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def census_worker(fw: Firewall, url: str, plugin: bool) -> NetnsWorker:
    return NetnsWorker(fw, "client", "examples.census.app", concurrency=2, cwd=REPO,
                       env=worker_env(url, plugin))  # fmt: skip


@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_worker_idle_past_the_firewall_timeout_loses_nothing(
    firewall: Firewall, plugin: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    server = firewall.redis_server()
    url = f"redis://{firewall.server_addr}:{server.port}"
    with census_worker(firewall, url, plugin) as worker:
        before = publish(firewall, url, 4)  # opens every connection in both children
        time.sleep(CONNTRACK_TIMEOUT + 5)  # idle: the firewall forgets idle flows
        after = publish(firewall, url, 4)
        forgotten = firewall.forgotten_packets()
        worker.kill()  # the control's children may hang on dead sockets
    with capsys.disabled():
        print(f"\n  firewall {'plugin' if plugin else 'control'}: before idle {before}, "
              f"after idle {after}, packets of forgotten flows dropped: {forgotten}")  # fmt: skip
    assert before == {"ok": 4, "failed": 0}
    if plugin:
        assert after == {"ok": 4, "failed": 0} and forgotten == 0
    else:
        assert after["failed"] >= 1 and forgotten >= 1


@pytest.mark.parametrize("heal", [True, False], ids=["heal", "control-no-heal"])
def test_sockets_the_kernel_aborted_are_healed_on_first_use(
    firewall: Firewall, heal: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Keepalive turns a dead path into a socket the kernel closed (not a hang); the next
    use of that socket must be healed. The task's own clients are healed by
    ResilientTask's in-process tier either way; Celery's result backend by the heal, or by
    redis-py itself where its pool checks a connection at checkout (see tests/upstream.py).
    """
    server = firewall.redis_server()
    url = f"redis://{firewall.server_addr}:{server.port}"
    worker = census_worker(firewall, url, plugin=True)
    worker.env["CELERY_RESILIENCE_KEEPALIVE_HEAL"] = "1" if heal else "0"
    with worker:
        before = publish(firewall, url, 4)
        firewall.block()  # probes go unanswered: after 1 + 1 * 3 s the kernel aborts
        time.sleep(8)
        firewall.unblock()
        after = publish(firewall, url, 4)
        log = worker.log
        worker.kill()
    healed = {kind: log.count(f"reconnecting {kind} to") for kind in ("redis", "redis.asyncio")}
    with capsys.disabled():
        print(f"\n  abort {'heal' if heal else 'no heal'}: before {before}, after the outage "
              f"{after}, reconnected before a write: {healed}")  # fmt: skip
    assert before == {"ok": 4, "failed": 0}
    if heal:
        assert after == {"ok": 4, "failed": 0}, tail(log, 60)  # which task failed, and how
        # The children's asyncio clients (their loops stopped between jobs) are healed by
        # us on every redis-py. The pooled sync clients only where redis-py does not
        # reconnect them at checkout itself: where it does, the heal finds live sockets.
        assert healed["redis.asyncio"] >= 1
        if upstream.REDIS_POOL_RECONNECTS_ABORTED_SOCKETS:
            assert healed["redis"] == 0
        else:
            assert healed["redis"] >= 1
    elif upstream.REDIS_POOL_RECONNECTS_ABORTED_SOCKETS:
        assert after == {"ok": 4, "failed": 0}  # this redis-py heals pooled sockets itself
    else:
        assert after["failed"] >= 1 and "Broken pipe" in log


def _abort(firewall: Firewall, sockets: list[socket.socket]) -> None:
    """Cut the path until keepalive (1 s idle, 1 s x 3 probes) has aborted every socket."""
    firewall.block()
    try:
        assert wait_until(lambda: all(hooks._aborted(s) for s in sockets), timeout=30)
    finally:
        firewall.unblock()


@pytest.mark.parametrize("heal", [True, False], ids=["heal", "control-no-heal"])
def test_which_connections_redis_py_heals_itself_after_a_keepalive_abort(
    firewall: Firewall, heal: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """The measurement behind the heal, per kind of connection, on this redis-py.

    ``pooled``: a client built from a URL (as kombu, Celery's backend and django-redis
    build theirs: no retries); redis-py checks a connection when the pool hands it out.
    ``bare``: a connection used without a checkout (a PubSub's, a single-connection
    client's). With the heal both write once; without it, ``bare`` fails on every
    redis-py and ``pooled`` fails unless redis-py reconnects timed-out sockets itself.
    """
    server = firewall.redis_server()
    keepalive.enable(lambda: keepalive.KeepaliveOptions(1, 1, 3, 0), heal=heal)
    netns_connection = firewall.connection_class("client")
    pooled = redis.Redis.from_url(
        f"redis://{firewall.server_addr}:{server.port}/0", connection_class=netns_connection
    )
    bare = netns_connection(host=firewall.server_addr, port=server.port)
    outcome: dict[str, str] = {}
    try:
        pooled.ping()
        bare.send_command("PING")
        bare.read_response()
        pooled_sock = pooled.connection_pool._available_connections[0]._sock
        _abort(firewall, [pooled_sock, bare._sock])
        for kind, incr in (("pooled", lambda: pooled.incr("pooled")),
                           ("bare", lambda: (bare.send_command("INCR", "bare"),
                                             bare.read_response())[1])):  # fmt: skip
            try:
                outcome[kind] = f"ok {incr()}"
            except redis.RedisError as exc:
                outcome[kind] = type(exc).__name__
    finally:
        keepalive.disable()
        pooled.close()
        bare.disconnect()
    with capsys.disabled():
        print(f"\n  keepalive abort, redis-py {redis.__version__}, heal={heal}: {outcome}")
    broken = upstream.REDIS_ABORTED_WRITE_ERROR
    pool_heals = upstream.REDIS_POOL_RECONNECTS_ABORTED_SOCKETS
    # Without the heal, the pooled write that fails finds the socket's error already read
    # by the pool's check (EPIPE: ConnectionError); the bare write meets the abort itself.
    assert outcome == {
        "pooled": "ok 1" if heal or pool_heals else "ConnectionError",
        "bare": "ok 1" if heal else broken,
    }
