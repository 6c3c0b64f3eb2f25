"""Seed 000 in the demo: keepalive on every Redis socket, and a firewall that drops idle flows.

1. The census: a real prefork worker (``-c 2``) of examples/census (broker, result backend,
   django-redis cache, application clients) runs 4 tasks; every established socket of its
   processes to Redis is read back from the kernel (``keepalive.audit_process``) and
   matched to the server's CLIENT LIST, as tests/integration/test_keepalive.py does. Counted:
   the sockets at 60/10/9 (and TCP_USER_TIMEOUT 150 s).
2. The firewall (as tests/integration/test_firewall.py; root, ``ip`` and ``nft`` needed): the
   worker runs in a network namespace behind a conntrack firewall that forgets idle flows
   after 3 s and then drops their packets. 4 tasks, 8 s idle, 4 tasks. Keepalive is set to
   1/1/3 there, to beat the 3 s timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from celery import Celery

from celery_resilience.keepalive import audit_process
from tests.bench.netns import Firewall, netns_available
from tests.bench.redis_server import RedisServer
from tests.bench.workers import PreforkWorker

from .demo_ui import Line, Row
from .pipeline.scenarios import REPO

SCENARIOS = 4
EXPECTED = {"keepalive": 1, "idle": 60, "interval": 10, "count": 9, "user_timeout": 150.0}
KINDS = {"0": "broker", "1": "backend", "2": "django-redis", "3": "app"}  # by Redis db
CONNTRACK_TIMEOUT = 3
IDLE = CONNTRACK_TIMEOUT + 5
AFTER_IDLE_TIMEOUT = 10.0  # the control's tasks hang on dead sockets: give up after this
Entries = list[dict[str, Any]]
CENSUS = ("census of a prefork worker", "sockets at 60/10/9")  # the table's row
FIREWALL = (f"firewall: {IDLE} s idle, {CONNTRACK_TIMEOUT} s timeout", "tasks ok before/after")


# -- the census -------------------------------------------------------------------------------


def worker_env(url: str, plugin: bool, **extra: str) -> dict[str, str]:
    return {
        "CENSUS_REDIS_URL": url,
        "CENSUS_PLUGIN": "1" if plugin else "0",
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **extra,
    }


def run_tasks(server: RedisServer, n: int = 4) -> set[int]:
    """Run ``census.touch`` n times at once (every kind of connection gets used)."""
    client = Celery("census-client", broker=server.url(0), backend=server.url(1),
                    set_as_current=False)  # fmt: skip
    try:
        results = [client.send_task("census.touch", args=(0.5,)) for _ in range(n)]
        # Seed 001's in-process worker, in another thread, makes Celery think this is a task
        # while it starts (task_join_will_block); this is no task: waiting here is fine.
        return {r.get(timeout=60, disable_sync_subtasks=False) for r in results}
    finally:
        client.close()


def census(server: RedisServer, worker: PreforkWorker) -> Entries:
    """Every established socket of the worker's processes to ``server``, with its kind."""
    kinds = {c["addr"]: KINDS.get(str(c.get("db")), "other") for c in server.client().client_list()}
    entries = []
    for pid in worker.group_pids():
        for entry in audit_process(pid, {f"127.0.0.1:{server.port}"}):
            entries.append({**entry, "kind": kinds.get(entry["local"], "closed")})
    return [e for e in entries if e["kind"] != "closed"]


def covered(entries: Entries) -> int:
    return sum(1 for e in entries if all(e.get(k) == v for k, v in EXPECTED.items()))


def take_census(plugin: bool, line: Line) -> Entries:
    with RedisServer() as server:
        line.say("starting a prefork worker")
        env = worker_env(f"redis://127.0.0.1:{server.port}", plugin)
        with PreforkWorker("examples.census.app", concurrency=2, cwd=REPO, env=env) as worker:
            line.say("4 tasks use every connection")
            run_tasks(server)
            line.say("reading the sockets back")
            entries = census(server, worker)
            line.say("stopping the worker")
        return entries


def settings_seen(entries: Entries) -> str:
    """e.g. ``11 x 7200/75/9, 8 x off``: the keepalive settings found, most common first."""
    seen = Counter(
        f"{e.get('idle')}/{e.get('interval')}/{e.get('count')}" if e.get("keepalive") else "off"
        for e in entries
    )
    return ", ".join(f"{n} x {setting}" for setting, n in seen.most_common())


# -- the firewall -----------------------------------------------------------------------------


class NetnsWorker(PreforkWorker):
    """A celery worker started inside one of the firewall's namespaces."""

    def __init__(self, fw: Firewall, ns: str, *args: Any, **kwargs: Any) -> None:
        self.fw, self.ns = fw, ns
        super().__init__(*args, **kwargs)

    @property
    def argv(self) -> list[str]:
        return self.fw.exec_prefix(self.ns) + super().argv


# Runs in the server's namespace, so only the worker's connections cross the firewall.
PUBLISH = """
import json, sys, time
from celery import Celery
url, n, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
app = Celery("publisher", broker=url + "/0", backend=url + "/1", set_as_current=False)
results = [app.send_task("census.touch", args=(0.2,)) for _ in range(n)]
deadline = time.monotonic() + timeout
ok = 0
for r in results:
    try:
        r.get(timeout=max(0.1, deadline - time.monotonic()))
        ok += 1
    except Exception:
        pass
print(json.dumps({"ok": ok, "failed": n - ok}))
"""


def publish(fw: Firewall, url: str, n: int, timeout: float = 30.0) -> dict[str, int]:
    """Publish n tasks from the server namespace; how many finished within ``timeout``."""
    argv = [sys.executable, "-c", PUBLISH, url, str(n), str(timeout)]
    proc = fw.run_in("server", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    out, err = proc.communicate(timeout=timeout + 60)
    lines = out.decode().strip().splitlines()
    if not lines:
        raise RuntimeError(f"the publisher printed nothing: {err.decode()[-2000:]}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def firewall_run(plugin: bool, line: Line) -> dict[str, Any]:
    with Firewall(conntrack_timeout=CONNTRACK_TIMEOUT) as fw:
        server = fw.redis_server()
        url = f"redis://{fw.server_addr}:{server.port}"
        keepalive = {f"CELERY_RESILIENCE_KEEPALIVE_{k}": "1" for k in ("IDLE", "INTERVAL")}
        env = worker_env(url, plugin, CELERY_RESILIENCE_KEEPALIVE_COUNT="3", **keepalive)
        line.say("starting a worker behind it")
        with NetnsWorker(fw, "client", "examples.census.app", cwd=REPO, env=env) as worker:
            line.say("4 tasks")
            before = publish(fw, url, 4)
            idle_until = time.monotonic() + IDLE
            line.probe = lambda: f"idle, {max(idle_until - time.monotonic(), 0):.0f}s to go"
            time.sleep(IDLE)
            line.probe = None
            line.say(f"4 tasks after idling (at most {AFTER_IDLE_TIMEOUT:.0f}s)")
            after = publish(fw, url, 4, AFTER_IDLE_TIMEOUT)
            dropped = fw.forgotten_packets()
            worker.kill()  # the control's children hang on dead sockets
    return {"before": before, "after": after, "dropped": dropped}


def tasks(outcome: dict[str, Any]) -> str:
    return f"{outcome['before']['ok']}/4, then {outcome['after']['ok']}/4"


# -- the seed ---------------------------------------------------------------------------------


CANNOT_READ = "reading another process's sockets needs Linux >= 5.6 (pidfd_getfd) and ptrace rights"


def census_skipped(line: Line) -> tuple[list[Row], list[str]]:
    line.stage("census: skipped")
    return [Row("000", *CENSUS, "skipped", "skipped")], [f"000 census: skipped: {CANNOT_READ}"]


def census_rows(line: Line) -> tuple[list[Row], list[str]]:
    if not hasattr(os, "pidfd_open"):
        return census_skipped(line)
    line.stage("census: plain")
    plain = take_census(False, line)
    line.stage("census: celery-resilience")
    plugin = take_census(True, line)
    if not plain or not plugin:  # audit_process found nothing it could read
        return census_skipped(line)
    row = Row("000", *CENSUS, f"{covered(plain)}/{len(plain)}", f"{covered(plugin)}/{len(plugin)}")
    kinds = Counter(e["kind"] for e in plugin)
    notes = [
        f"000 census: the sockets by kind: {', '.join(f'{n} {k}' for k, n in kinds.items())}; "
        f"keepalive idle/interval/count without the plugin: {settings_seen(plain)}"
    ]
    return [row], notes


def firewall_rows(line: Line) -> tuple[list[Row], list[str]]:
    ok, reason = netns_available()
    if not ok:
        line.stage("firewall: skipped")
        row = Row("000", *FIREWALL, "skipped", "skipped")
        return [row], [f"000 firewall: skipped: {reason}"]
    line.stage("firewall: plain")
    plain = firewall_run(False, line)
    line.stage("firewall: celery-resilience")
    plugin = firewall_run(True, line)
    row = Row("000", *FIREWALL, tasks(plain), tasks(plugin))
    note = (
        f"000 firewall: packets of forgotten flows dropped: {plain['dropped']} (plain), "
        f"{plugin['dropped']} (resilience, keepalive 1/1/3 to beat the {CONNTRACK_TIMEOUT} s "
        f"timeout); the plain tasks that did not finish within {AFTER_IDLE_TIMEOUT:.0f}s hang "
        "on dead sockets"
    )
    return [row], [note]


def run(line: Line) -> tuple[list[Row], list[str]]:
    """The census, then the firewall; the table rows and notes."""
    census_part, census_notes = census_rows(line)
    firewall_part, firewall_notes = firewall_rows(line)
    line.done()
    return census_part + firewall_part, census_notes + firewall_notes
