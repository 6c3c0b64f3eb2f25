"""The prefork pool across a lost broker connection, on real billiard child processes.

On a lost connection Celery's consumer calls ``AsynPool.flush()``, which forgets jobs the
children will still run (Celery <= 5.6: every job; 5.7: those written to a child but not
yet accepted), so their tasks are never acked. The plugin's pool keeps a live child's
jobs, and not the job of a child that died meanwhile: nothing may stay "running" for good.
"""

from __future__ import annotations

import os
import signal
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from billiard.pool import ApplyResult
from celery.concurrency import asynpool
from kombu.asynchronous import Hub

from celery_resilience.worker import pool
from celery_resilience.worker.running import still_running
from tests import upstream

pytestmark = pytest.mark.integration


@pytest.fixture
def make_pool() -> Iterator[Any]:
    made: list[tuple[Any, Hub]] = []

    def make(cls: type) -> Any:
        hub = Hub()
        p = cls(processes=2, threads=False)
        p.register_with_event_loop(hub)  # the consumer does this; flush needs its handlers
        made.append((p, hub))
        return p

    yield make
    for p, hub in made:
        p.terminate()
        p.join()
        hub.close()


def job(p: Any, proc: Any, accepted: bool) -> Any:
    """A job written to ``proc``; ``accepted``: the child has taken it (it runs)."""
    j = ApplyResult(p._cache, lambda *_: None)
    j._write_to = proc
    if accepted:
        j._accepted, j._worker_pid = True, proc.pid
    return j


@pytest.mark.parametrize("plugin", [True, False], ids=["kept", "control"])
def test_a_flush_keeps_live_childrens_jobs_and_drops_a_killed_childs(
    plugin: bool, make_pool: Any
) -> None:
    p = make_pool(pool.AsynPool if plugin else asynpool.AsynPool)
    live, killed = p._pool[0], p._pool[1]
    running, written, orphaned = job(p, live, True), job(p, live, False), job(p, killed, True)
    os.kill(killed.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while killed.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    p.flush()  # reaps the killed child on its way (maintain_pool)
    kept = {name for name, j in (("running", running), ("written", written),
                                 ("orphaned", orphaned)) if j in p._cache.values()}  # fmt: skip
    if plugin:
        assert kept == {"running", "written"}
    elif upstream.CELERY_FLUSH_KEEPS_ACCEPTED_JOBS:
        assert kept == {"running"}  # the written job runs in its child, and is never acked
    else:
        assert kept == set()  # every job forgotten: none of their tasks is ever acked
    request = Request(weakref.ref(orphaned))
    assert not still_running(weakref.ref(request)), "the killed child's job runs for good"


class Request:
    """What the worker's ledger reads of the Celery request a job runs."""

    acknowledged = False

    def __init__(self, apply_result: Any) -> None:
        self._apply_result = apply_result
