"""Seed 000: keepalive on every Redis socket a real worker opens, read back from the kernel.

The census app (examples/census) holds every kind of connection: broker (db 0), result
backend (db 1), django-redis cache (db 2), and on db 3 an application client, a client
opened at import time before the worker booted, and an asyncio client. Each socket of the
worker's processes is read with pidfd_getfd + getsockopt and matched to the server's
CLIENT LIST, so the census knows which kind each socket is.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_resilience.keepalive import audit_process
from tests import upstream
from tests.bench.redis_server import RedisServer
from tests.bench.workers import PreforkWorker

pytestmark = pytest.mark.integration
REPO = str(Path(__file__).resolve().parents[2])
EXPECTED = {"keepalive": 1, "idle": 60, "interval": 10, "count": 9, "user_timeout": 150.0}


def census_worker(
    server: RedisServer, pool: str, plugin: bool, queues: list[str] | None = None, **env: str
) -> PreforkWorker:
    return PreforkWorker(
        "examples.census.app", pool=pool, concurrency=2, cwd=REPO, queues=queues,
        env={"CENSUS_REDIS_URL": f"redis://127.0.0.1:{server.port}",
             "CENSUS_PLUGIN": "1" if plugin else "0",
             "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **env},
    )  # fmt: skip


def run_tasks(server: RedisServer, broker_url: str, n: int = 4) -> set[int]:
    """Run ``census.touch`` n times at once; the pids of the processes that ran them."""
    client = Celery("census-client", broker=broker_url, backend=server.url(1),
                    set_as_current=False)  # fmt: skip
    results = [client.send_task("census.touch", args=(0.5,)) for _ in range(n)]
    try:
        return {r.get(timeout=60) for r in results}
    finally:
        client.close()


def census(server: RedisServer, worker: PreforkWorker) -> list[dict[str, Any]]:
    """Every established socket of the worker's processes to ``server``, with its kind."""
    kinds = {c["addr"]: _kind(c) for c in server.client().client_list()}
    entries = []
    for pid in worker.group_pids():
        for entry in audit_process(pid, {f"127.0.0.1:{server.port}"}):
            entries.append({**entry, "kind": kinds.get(entry["local"], "closed")})
    return [e for e in entries if e["kind"] != "closed"]


def _kind(client: dict[str, Any]) -> str:
    return {"0": "broker", "1": "backend", "2": "django-redis", "3": "app"}.get(
        str(client.get("db")), "other"
    )


def covered(entries: list[dict[str, Any]]) -> int:
    return sum(1 for e in entries if all(e.get(k) == v for k, v in EXPECTED.items()))


@pytest.mark.skipif(
    not hasattr(os, "pidfd_open") or not hasattr(socket, "TCP_KEEPIDLE"),
    reason="needs Linux >= 5.6 (pidfd_getfd) to read another process's sockets",
)
@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_every_redis_socket_of_the_worker_has_keepalive(
    private_redis: RedisServer, pool: str, plugin: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    with census_worker(private_redis, pool, plugin) as worker:
        pids = run_tasks(private_redis, private_redis.url(0))
        entries = census(private_redis, worker)
        log, main_pid = worker.log, worker.pid
    kinds = {e["kind"] for e in entries}
    assert {"broker", "backend", "django-redis", "app"} <= kinds, entries
    if pool == "prefork":
        assert len(pids) == 2 and main_pid not in pids  # both children ran tasks
        assert {e["pid"] for e in entries} >= pids | {main_pid}
    with capsys.disabled():
        print(f"\n  census {pool:<8} {'plugin' if plugin else 'control'}: keepalive 60/10/9/150 on "
              f"{covered(entries)}/{len(entries)} redis sockets, SO_KEEPALIVE at all on "
              f"{sum(1 for e in entries if e.get('keepalive') == 1)} (by kind: "
              f"{ {k: sum(1 for e in entries if e['kind'] == k) for k in sorted(kinds)} })")  # fmt: skip
    if plugin:
        assert covered(entries) == len(entries), [e for e in entries if e.get("idle") != 60]
        assert "resilience: keepalive idle=60s interval=10s count=9 user_timeout=150s on" in log
    else:
        assert covered(entries) < len(entries)


def _amqp_url() -> str | None:
    """AMQP_URL, else a RabbitMQ on localhost:5672 if one answers."""
    url = os.environ.get("AMQP_URL")
    if url:
        return url
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        return None
    return "amqp://guest:guest@127.0.0.1:5672//"


@pytest.mark.skipif(_amqp_url() is None, reason="no RabbitMQ at AMQP_URL or localhost:5672")
@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_seed_000_deployment_rabbitmq_broker_redis_backend_and_cache(
    private_redis: RedisServer, plugin: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _amqp_url()
    assert url is not None
    # A vhost-free queue name per run keeps runs apart on a shared RabbitMQ.
    queue = f"census-{os.getpid()}-{private_redis.port}"
    worker = census_worker(private_redis, "prefork", plugin, [queue], CENSUS_BROKER_URL=url)
    client = Celery("census-client", broker=url, backend=private_redis.url(1),
                    set_as_current=False)  # fmt: skip
    try:
        with worker:
            results = [client.send_task("census.touch", args=(0.5,), queue=queue)
                       for _ in range(4)]  # fmt: skip
            pids = {r.get(timeout=60) for r in results}
            entries = census(private_redis, worker)
    finally:  # after the worker stopped: a live consumer would declare it again
        with client.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)  # the RabbitMQ may be shared
        client.close()
    kinds = {e["kind"] for e in entries}
    assert len(pids) == 2 and {"backend", "django-redis", "app"} <= kinds and "broker" not in kinds
    with capsys.disabled():
        print(f"\n  census rabbitmq {'plugin' if plugin else 'control'}: "
              f"{covered(entries)}/{len(entries)} redis sockets at 60/10/9/150")  # fmt: skip
    if plugin:
        assert covered(entries) == len(entries)
    else:
        assert covered(entries) < len(entries)


# Celery 5.3's CLI has a fixed list of inspect commands; the package's own CLI works on all.
INSPECT = (
    [sys.executable, "-m", "celery", "-A", "examples.census.app", "inspect", "--json",
     "--timeout", "10", "resilience_sockets"]
    if upstream.CELERY_CLI_RUNS_CUSTOM_INSPECT
    else [sys.executable, "-m", "celery_resilience.control", "-A", "examples.census.app",
          "--timeout", "10"]
)  # fmt: skip


def test_inspect_resilience_sockets_reports_the_census(private_redis: RedisServer) -> None:
    with census_worker(private_redis, "prefork", True) as worker:
        run_tasks(private_redis, private_redis.url(0))
        proc = subprocess.run(
            INSPECT,
            env={**os.environ, **worker.env}, cwd=REPO, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        children = set(worker.group_pids()) - {worker.pid}
    assert proc.returncode == 0, proc.stderr
    replies = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert len(replies) == 1
    (reply,) = replies.values()
    every = reply["main"] + [e for es in reply["children"].values() for e in es]
    assert {int(pid) for pid in reply["children"]} == children
    assert all(reply["children"].values()), "every child reported its sockets"
    assert all(e["keepalive"] == 1 and e["idle"] == 60 and e["interval"] == 10
               and e["count"] == 9 and e["user_timeout"] == 150 for e in every)  # fmt: skip
    assert reply["summary"] == f"keepalive on {len(every)}/{len(every)} redis sockets"
