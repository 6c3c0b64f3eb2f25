"""Self-tests of the firewall bench (tests/bench/netns.py).

A redis-py client in the ``client`` namespace talks to a redis-server in the ``server``
namespace through the conntrack firewall in ``fw``.  It PINGs, stays idle well past the
firewall's conntrack timeout, then PINGs again:

* without keepalive (the control) the firewall has forgotten the flow and the second PING
  fails: a read timeout with the silent drop, ECONNRESET with ``reject_forgotten``;
* with SO_KEEPALIVE idle=1 s the probes keep the flow alive and the second PING succeeds.

The client waits for a line on stdin before its second PING, so the test can look at the
firewall's conntrack table while the connection is idle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.bench import pid_alive
from tests.bench.netns import Firewall, list_namespaces, netns_available, sweep_stale

pytestmark = [pytest.mark.integration, pytest.mark.fault]

TIMEOUT = 3  # conntrack established timeout in fw, seconds
IDLE = TIMEOUT + 3  # how long the client stays idle between its two PINGs
SOCKET_TIMEOUT = 5

CLIENT = r"""
import json, socket, sys
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

host, port, keepalive, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
options = {}
if keepalive:
    options = {socket.TCP_KEEPIDLE: 1, socket.TCP_KEEPINTVL: 1, socket.TCP_KEEPCNT: 3}
client = redis.Redis(
    host=host, port=port, retry=Retry(NoBackoff(), 0),
    socket_timeout=timeout, socket_connect_timeout=timeout,
    socket_keepalive=keepalive, socket_keepalive_options=options,
)

def emit(**fields):
    print(json.dumps(fields), flush=True)

first = client.ping()
sock = client.connection_pool._available_connections[0]._sock
emit(
    first=first,
    local_port=sock.getsockname()[1],
    so_keepalive=sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    keepidle=sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    keepintvl=sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
    keepcnt=sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
)
sys.stdin.readline()  # idle until the test says go
try:
    second = client.ping()
except Exception as exc:
    cause = exc.__cause__ or exc.__context__
    emit(ok=False, type=f"{type(exc).__module__}.{type(exc).__qualname__}", message=str(exc),
         cause=None if cause is None else type(cause).__name__,
         errno=getattr(cause, "errno", None))
else:
    emit(ok=True, second=second)
"""


def _require_bench() -> None:
    ok, reason = netns_available()
    if ok:
        return
    if os.environ.get("CI") == "true" and os.geteuid() == 0:
        pytest.fail(f"CI=true and root, but the firewall bench cannot be built: {reason}")
    pytest.skip(reason)


@pytest.fixture
def firewall(request: pytest.FixtureRequest) -> Iterator[Firewall]:
    """A started Firewall (``reject_forgotten`` from indirect parametrisation, default drop)."""
    _require_bench()
    reject = getattr(request, "param", "drop") == "reject"
    with Firewall(conntrack_timeout=TIMEOUT, reject_forgotten=reject) as fw:
        yield fw


def _idle_ping(fw: Firewall, *, keepalive: bool) -> dict[str, Any]:
    """PING, idle IDLE seconds, PING again from the client namespace; both reports merged,
    plus the firewall's view of the flow while it was idle."""
    server = fw.redis_server()
    proc = fw.run_in(
        "client",
        [
            sys.executable,
            "-c",
            CLIENT,
            fw.server_addr,
            str(server.port),
            "1" if keepalive else "0",
            str(SOCKET_TIMEOUT),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None
    first_line = proc.stdout.readline()
    if not first_line:
        proc.wait(10)
        pytest.fail(f"client died before its first PING: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
    report: dict[str, Any] = json.loads(first_line)
    assert fw.conntrack(report["local_port"]) != [], "the live flow is not in conntrack"
    time.sleep(IDLE)
    report["conntrack_when_idle"] = fw.conntrack(report["local_port"])
    report["forgotten_before"] = fw.forgotten_packets()
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    second_line = proc.stdout.readline()
    stderr = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert proc.wait(10) == 0, stderr
    report.update(json.loads(second_line))
    report["forgotten_after"] = fw.forgotten_packets()
    print(json.dumps(report, indent=1))  # shown when the test fails
    return report


@pytest.mark.parametrize("firewall", ["drop", "reject"], indirect=True)
def test_idle_connection_without_keepalive_is_dropped(firewall: Firewall) -> None:
    """The control: the firewall forgets the idle flow and the next command fails."""
    report = _idle_ping(firewall, keepalive=False)

    assert report["first"] is True
    assert report["so_keepalive"] == 0
    # conntrack has forgotten the flow (None: this kernel has no procfs view of it).
    if report["conntrack_when_idle"] is not None:
        assert report["conntrack_when_idle"] == []
    assert report["forgotten_before"] == 0
    assert report["ok"] is False
    if firewall.reject_forgotten:
        assert report["type"] == "redis.exceptions.ConnectionError"
        assert report["cause"] == "ConnectionResetError"
        assert report["errno"] == 104  # ECONNRESET
        assert report["forgotten_after"] == 1  # the PING, answered by one reset
    else:
        assert report["type"] == "redis.exceptions.TimeoutError"
        # socket.timeout is TimeoutError from Python 3.10 on; the message varies with redis-py.
        assert report["cause"] in ("TimeoutError", "timeout")
        assert report["forgotten_after"] >= 1  # the PING and its retransmissions


def test_keepalive_keeps_idle_connection_through_firewall(firewall: Firewall) -> None:
    """Keepalive probes every second refresh conntrack: the flow survives the idle time."""
    report = _idle_ping(firewall, keepalive=True)

    assert report["first"] is True
    assert (report["so_keepalive"], report["keepidle"], report["keepintvl"], report["keepcnt"]) == (
        1,
        1,
        1,
        3,
    )
    if report["conntrack_when_idle"] is not None:
        assert len(report["conntrack_when_idle"]) == 1
        assert " ESTABLISHED " in report["conntrack_when_idle"][0]
    assert report == {**report, "ok": True, "second": True}
    assert report["forgotten_after"] == 0


def test_teardown_leaves_no_namespace_and_no_process() -> None:
    _require_bench()
    fw = Firewall(conntrack_timeout=TIMEOUT).start()
    names = set(fw.names.values())
    assert names <= set(list_namespaces())
    server = fw.redis_server()
    assert server.client(db=1).ping() is True  # from inside "server", not via the firewall
    sleeper = fw.run_in("client", ["sleep", "600"])
    pids = [server.pid, sleeper.pid]
    assert all(pid is not None and pid_alive(pid) for pid in pids)

    fw.stop()
    fw.stop()  # idempotent

    assert names.isdisjoint(list_namespaces())
    assert not [pid for pid in pids if pid is not None and pid_alive(pid)]


def test_namespaces_of_a_dead_session_are_swept() -> None:
    """A SIGKILLed session cannot delete its namespaces; the next one does."""
    _require_bench()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"crfw-{dead.pid}-0-client"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in sweep_stale()
        assert stale not in list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], check=False, capture_output=True)
