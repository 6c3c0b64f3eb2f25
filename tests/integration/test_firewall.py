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
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bench._proc import tail
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


def _pool_heals_at_checkout() -> bool:
    """Whether the control recovers on its own: it does on Python 3.9 only.

    The first write on a socket keepalive aborted fails with ETIMEDOUT. redis-py catches
    ``socket.timeout`` before ``OSError``; since Python 3.10 ``socket.timeout`` *is*
    ``TimeoutError``, so the error becomes redis ``TimeoutError`` (not retried by Celery's
    result backend: the task fails, 2/4). On 3.9 it becomes ``ConnectionError``, which the
    backend retries on a new connection (4/4). Measured in the full matrix: py39 with
    redis-py 4.6 and 5.3 finish 4/4; py310-313 with redis-py 4.6 to 8.1 fail 2/4.
    """
    return sys.version_info < (3, 10)


@pytest.mark.parametrize("heal", [True, False], ids=["heal", "control-no-heal"])
def test_sockets_the_kernel_aborted_are_healed_on_first_use(
    firewall: Firewall, heal: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Keepalive turns a dead path into a socket the kernel closed (not a hang); the next
    use of that socket must be healed. The task's own clients are healed by
    ResilientTask's in-process tier either way; Celery's result backend only by the heal.
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
    healed = log.count("the kernel closed the idle socket")
    with capsys.disabled():
        print(f"\n  abort {'heal' if heal else 'no heal'}: before {before}, after the outage "
              f"{after}, reconnected before a write: {healed}")  # fmt: skip
    assert before == {"ok": 4, "failed": 0}
    if heal:
        assert after == {"ok": 4, "failed": 0}, tail(log, 60)  # which task failed, and how
        assert healed >= 1 or _pool_heals_at_checkout()
    elif _pool_heals_at_checkout():
        assert after == {"ok": 4, "failed": 0}  # this redis-py heals on its own
    else:
        assert after["failed"] >= 1 and "Broken pipe" in log
