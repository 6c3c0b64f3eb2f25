"""No message and no worker lost across Redis restarts (issue 6), on real prefork workers.

Each scenario runs with the plugin and, as its control, with plain Celery (the same
tasks with ``autoretry_for``, kombu's own BRPOP). The job is ``tests/bench/jobapp.py``:
each item is recorded idempotently and every run is counted, so losses and duplicates
both show. Remote control is on (Celery's default) in every worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import kombu
import pytest
import redis
from celery import Celery

from tests import upstream
from tests.bench._proc import tail
from tests.bench.jobapp import in_flight, progress, wait_until
from tests.bench.redis_server import RedisServer
from tests.bench.workers import PreforkWorker

pytestmark = [pytest.mark.integration, pytest.mark.fault]
REPO = str(Path(__file__).resolve().parents[2])
CELERY_CLOSES_COLLECTED = upstream.CELERY_CLOSES_COLLECTED
HOSTNAME_CRASH = "'NoneType' object has no attribute 'hostname'"


def worker_for(server_url: str, plugin: bool, **env: Any) -> PreforkWorker:
    return PreforkWorker(
        "tests.bench.jobapp", cwd=REPO, concurrency=int(env.pop("concurrency", 2)),
        env={"JOB_BROKER_URL": server_url, "JOB_PLUGIN": "1" if plugin else "0",
             "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             **{k: str(v) for k, v in env.items()}},
    )  # fmt: skip


def producer(url: str) -> Celery:
    return Celery("producer", broker=url, set_as_current=False)


def send(app: Celery, n: int, seconds: float = 0.0, **options: Any) -> None:
    app.send_task("job.item", args=[n, seconds], **options)


def unacked_tags(client: redis.Redis) -> dict[int, dict[str, Any]]:
    """Item number -> its unacked record's payload, for the records Redis holds now."""
    out = {}
    for raw in client.hvals("unacked"):
        payload = json.loads(raw)[0]
        out[_item_of(payload)] = payload
    return out


def queued(client: redis.Redis, queue: str = "celery") -> dict[int, dict[str, Any]]:
    return {_item_of(p): p for p in map(json.loads, client.lrange(queue, 0, -1))}


def _item_of(payload: dict[str, Any]) -> int:
    import base64

    body = json.loads(base64.b64decode(payload["body"]))
    return int(body[0][0])


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


# -- gap 1: a restart with tasks running ------------------------------------------------------


@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_worker_survives_a_redis_restart_while_tasks_run(plugin: bool, server: RedisServer) -> None:
    client = server.client()
    app = producer(server.url())
    with worker_for(server.url(), plugin) as worker:
        for n in range(6):  # 2 running, 4 prefetched
            send(app, n, 2.0)
        assert wait_until(lambda: client.hlen("unacked") == 6, 10)
        server.restart(down_for=1.0)
        settled = wait_until(lambda: progress(client, 6)["done"] == 6 or not worker.alive, 15)
        settled = settled and worker.alive and wait_until(lambda: _idle(client), 10)
        alive, log = worker.alive, worker.log
    job = progress(client, 6)
    lost_acks = log.count("Couldn't ack")  # kombu's line for an ack Redis did not take
    print(f"\n  restart with tasks running ({'plugin' if plugin else 'control'}): alive={alive} "
          f"job={job} unacked={client.hlen('unacked')} lost acks={lost_acks}")  # fmt: skip
    if plugin:
        assert alive and HOSTNAME_CRASH not in log
        # A task that finished while Redis was still down could not be acked: at least
        # once, it runs again. No other task may. (Once, under a load of 9, 2 tasks ran
        # twice here; the cause is not known yet: the log tail below is for that.)
        assert settled and job == {"done": 6, "count": 6, "duplicates": lost_acks}, tail(log, 80)
        assert (client.hlen("unacked"), in_flight(client)) == (0, 0)
    elif CELERY_CLOSES_COLLECTED:
        assert not alive and HOSTNAME_CRASH in log
    else:  # it lives, but what it had prefetched is lost (kombu 5.5) or waits an hour
        assert alive and not settled and job["done"] < 6


# -- gap 2: the window between taking a message and recording it ------------------------------


@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_a_lost_fetch_reply_loses_no_task(
    plugin: bool, server: RedisServer, reset_proxy: Callable[[Any], Any]
) -> None:
    """The 4th fetch's reply is dropped and the connection reset after Redis ran it."""
    proxy = reset_proxy(server)
    client = server.client()
    app = producer(server.url())
    proxy.arm(rb"EVALSHA" if plugin else rb"BRPOP", nth=4, when="after")
    for n in range(10):
        send(app, n)
    with worker_for(proxy.url(), plugin, concurrency=1):
        # Everything that is still anywhere has run (the control's lost one is nowhere).
        wait_until(lambda: progress(client, 10)["done"] >= 9 and _idle(client), 20)
        wait_until(lambda: progress(client, 10)["done"] == 10, 1.0)
    job = progress(client, 10)
    print(f"\n  lost fetch reply ({'plugin' if plugin else 'control'}): resets={proxy.resets} "
          f"job={job} queued={client.llen('celery')} unacked={client.hlen('unacked')}")  # fmt: skip
    assert proxy.resets == 1
    if plugin:
        assert job == {"done": 10, "count": 10, "duplicates": 0}
        assert (client.llen("celery"), client.hlen("unacked"), in_flight(client)) == (0, 0, 0)
    else:  # taken off the list by BRPOP, never recorded: in neither place
        assert job["done"] == 9 and client.llen("celery") == 0 and client.hlen("unacked") == 0


# -- gap 3: prefetched work comes back promptly, held work is not delivered twice -------------


@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_prefetched_messages_are_back_within_10s_of_a_connection_loss(
    plugin: bool, server: RedisServer
) -> None:
    """One long task runs, three wait prefetched; Redis restarts (2 s) with its data, and
    once more while the long task still runs (it must not be handed back either time)."""
    client = server.client()
    app = producer(server.url())
    with worker_for(server.url(), plugin, concurrency=1) as worker:
        send(app, 0, 16.0)
        for n in (1, 2, 3):
            send(app, n)
        assert wait_until(lambda: client.hlen("unacked") == 4, 10)
        server.restart(down_for=2.0)
        back = wait_until(lambda: _restored(client, {1, 2, 3}), 10)
        finished = False
        if back and wait_until(lambda: client.hlen("unacked") == 4, 10):  # taken again
            server.restart(down_for=2.0)
            finished = wait_until(lambda: progress(client, 4)["done"] == 4, 30)
            # Nothing left to run: a long task handed back by mistake would have run again.
            wait_until(lambda: _idle(client), 25)
        alive = worker.alive
    job = progress(client, 4)
    print(f"\n  prefetched after a restart ({'plugin' if plugin else 'control'}): back within "
          f"10 s: {back}; job={job} alive={alive}")  # fmt: skip
    if plugin:
        assert back and finished and alive
        assert job == {"done": 4, "count": 4, "duplicates": 0}  # the long task ran once
        assert (client.hlen("unacked"), in_flight(client)) == (0, 0)
    else:
        assert not back  # still in unacked, for the visibility timeout (an hour)


def _idle(client: redis.Redis) -> bool:
    return bool(client.hlen("unacked") + client.llen("celery") == 0)


def _restored(client: redis.Redis, items: set[int]) -> bool:
    """Each item run, or handed back (kombu marks a restored message ``redelivered``)."""
    seen = {**unacked_tags(client), **queued(client)}
    done = {int(n) for n in client.smembers("job:done")}
    return all(n in done or seen.get(n, {}).get("headers", {}).get("redelivered")
               for n in items)  # fmt: skip


@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
@pytest.mark.parametrize("held", ["running", "eta"])
def test_a_message_held_longer_than_the_visibility_timeout_runs_once(
    plugin: bool, held: str, server: RedisServer
) -> None:
    """visibility_timeout=2: a task running 5 s, or a countdown of 5 s. 3 s in, kombu's
    visibility-timeout restore sweeps the unacked index, as any worker's timer does.

    The sweep is run here, not left to a second worker's timer: kombu 5.3 sweeps 10 s
    after a worker starts and then every 100 s, so whether a timer swept within the
    window depended on how fast the workers started (a vanilla 5.3 run that swept
    nothing ran the task once and the control failed on a quiet machine)."""
    client = server.client()
    app = producer(server.url())
    env = {"JOB_VISIBILITY_TIMEOUT": 2, "concurrency": 1}
    runs = lambda: int(client.get("job:runs:0") or 0)  # noqa: E731
    with worker_for(server.url(), plugin, **env):
        if held == "running":
            send(app, 0, 5.0)
        else:
            send(app, 0, countdown=5)
        assert wait_until(lambda: client.hlen("unacked") == 1, 10)
        time.sleep(3)
        with kombu.Connection(server.url(), transport_options={"visibility_timeout": 2}) as c:
            c.default_channel.qos.restore_visible(num=None)
        wait_until(lambda: runs() >= 2, 7)  # a second delivery has run by then
    runs = runs()
    print(f"\n  {held} past the visibility timeout ({'plugin' if plugin else 'control'}): "
          f"ran {runs}x")  # fmt: skip
    assert runs == 1 if plugin else runs >= 2


@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_what_the_worker_holds_survives_a_restart_that_lost_redis_data(
    plugin: bool, server: RedisServer
) -> None:
    """Redis comes back empty (SHUTDOWN NOSAVE). The worker held one running task and
    three prefetched ones; two more waited in the queue, which Redis alone held."""
    client = server.client()
    app = producer(server.url())
    send(app, 0, 4.0)
    for n in range(1, 6):
        send(app, n)
    with worker_for(server.url(), plugin, concurrency=1):
        assert wait_until(lambda: client.hlen("unacked") == 4 and client.llen("celery") == 2, 10)
        server.restart(down_for=1.0, save=False)
        wait_until(lambda: progress(client, 6)["done"] >= 4 and _idle(client), 12)
        wait_until(lambda: progress(client, 6)["done"] > 4, 2.0)
    done = {int(n) for n in client.smembers("job:done")}
    print(f"\n  restart without persistence ({'plugin' if plugin else 'control'}): "
          f"ran {sorted(done)}")  # fmt: skip
    if plugin:  # in memory: pushed back; only in Redis: gone with it
        assert len(done) == 4 and 0 in done and (unacked_tags(client), in_flight(client)) == ({}, 0)
    else:
        assert done == {0}


@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_a_killed_workers_messages_are_run_by_another_worker(
    plugin: bool, server: RedisServer
) -> None:
    """Worker A holds one running and three prefetched tasks and is SIGKILLed; worker B's
    reclaimer finds A's heartbeat stale (orphan timeout 3 s) and puts them back."""
    client = server.client()
    app = producer(server.url())
    env = {"JOB_ORPHAN_TIMEOUT": 3, "JOB_HEARTBEAT": 0.5, "concurrency": 1}
    send(app, 0, 2.0)
    for n in range(1, 4):
        send(app, n)
    with worker_for(server.url(), plugin, **env) as doomed:
        assert wait_until(lambda: client.hlen("unacked") == 4, 10)
        doomed.kill()
    with worker_for(server.url(), plugin, **env):
        finished = wait_until(lambda: progress(client, 4)["done"] == 4 and _idle(client), 12)
    job = progress(client, 4)
    print(f"\n  killed worker ({'plugin' if plugin else 'control'}): {job}, "
          f"unacked={client.hlen('unacked')}")  # fmt: skip
    if plugin:
        assert (
            finished and job["done"] == 4 and (client.hlen("unacked"), in_flight(client)) == (0, 0)
        )
    else:
        assert job["done"] == 0 and client.hlen("unacked") == 4  # for the visibility timeout


# -- the job: many restarts of every kind -----------------------------------------------------


@dataclasses.dataclass
class Fault:
    kind: str  # "save": SHUTDOWN SAVE; "kill": SIGKILL, back from the last BGSAVE
    after: float  # seconds of work before it
    down: float


def schedule(seed: int, restarts: int = 10) -> list[Fault]:
    rng = random.Random(seed)
    faults = [Fault(rng.choice(["save", "kill"]), rng.uniform(1.0, 4.0), rng.uniform(0.3, 3.0))
              for _ in range(restarts)]  # fmt: skip
    faults[rng.randrange(restarts)].down = 11.0  # one outage longer than 10 s
    return faults


@dataclasses.dataclass
class Run:
    job: dict[str, int]
    crashes: int
    alive: bool
    unacked: int
    in_flight: int
    queued: int
    seconds: float

    def lost(self, n: int) -> int:
        return n - self.job["done"]


def run_job(server: RedisServer, plugin: bool, n: int, faults: list[Fault]) -> Run:
    """``n`` tasks (30 ms of work each) on a prefork worker (-c 2, prefetch 8) through
    ``faults``; a crashed worker is started again (and counted) so the job can go on."""
    client = server.client()
    app = producer(server.url())
    for i in range(n):
        send(app, i, 0.03)
    client.bgsave()
    started = time.monotonic()
    crashes = 0
    worker = worker_for(server.url(), plugin).start()
    try:
        for fault in faults:
            time.sleep(fault.after)
            if not worker.alive:
                crashes += 1
                worker.start()
            if fault.kind == "kill":
                server.kill()
                time.sleep(fault.down)
                server.start()  # from the last BGSAVE: what Redis had then comes back
            else:
                server.restart(down_for=fault.down, save=True)
            wait_until(lambda: client.ping(), 10)
            client.bgsave()
        for _ in range(3):  # let it finish; restart a worker that died on the last fault
            wait_until(lambda: _settled(client, n), 60)
            if worker.alive:
                break
            crashes += 1
            worker.start()
        alive = worker.alive
    finally:
        worker.close()
    return Run(progress(client, n), crashes, alive, int(client.hlen("unacked")),
               in_flight(client), int(client.llen("celery")), time.monotonic() - started)  # fmt: skip


def _settled(client: redis.Redis, n: int) -> bool:
    idle = client.llen("celery") == 0 and client.hlen("unacked") == 0
    return bool(progress(client, n)["done"] == n and idle and in_flight(client) == 0)


JOB_N = 2000
SEED = int(os.environ.get("RESTART_SEED", "6"))


@pytest.mark.slow
@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_a_2000_task_job_survives_10_redis_restarts(plugin: bool, server: RedisServer) -> None:
    faults = schedule(SEED)
    run = run_job(server, plugin, JOB_N, faults)
    kinds = ", ".join(f"{f.kind}:{f.down:.1f}s" for f in faults)
    print(f"\n  2000 tasks, restarts [{kinds}] (seed {SEED}), "
          f"{'plugin' if plugin else 'control'}: {run}, lost {run.lost(JOB_N)}")  # fmt: skip
    if plugin:
        assert run.alive and run.crashes == 0
        assert run.job["done"] == JOB_N and run.job["count"] == JOB_N  # each effect once
        assert (run.unacked, run.in_flight, run.queued) == (0, 0, 0)
    else:
        assert run.crashes >= 1 or run.lost(JOB_N) >= 1
