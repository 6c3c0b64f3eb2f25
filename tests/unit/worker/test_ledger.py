"""What a worker holds and runs: the ledger, Celery's worker state, the lease schedule."""

from __future__ import annotations

import os
import time
import weakref
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.worker import state

from celery_resilience.redis.fetch import FetchOptions
from celery_resilience.worker import running
from celery_resilience.worker.ledger import Kept, Ledger, lost_since
from celery_resilience.worker.reclaimer import Reclaimer


class Request:
    """What worker/running.py reads of a Celery request."""

    def __init__(self, tag: str, handed_to_pool: bool = False) -> None:
        self._message = SimpleNamespace(delivery_tag=tag)
        self._apply_result = (lambda: None) if handed_to_pool else None
        self.acknowledged = False


def test_running_tasks_are_the_active_ones_and_those_handed_to_the_pool() -> None:
    active, handed, waiting = Request("a"), Request("h", True), Request("w")
    state.active_requests.add(active)
    for r in (active, handed, waiting):
        state.reserved_requests.add(r)
    try:
        assert set(running.running()) == {"a", "h"}
    finally:
        state.active_requests.discard(active)
        for r in (active, handed, waiting):
            state.reserved_requests.discard(r)


class Job:
    """A billiard job: it sits in the pool's job table while the pool tracks it."""

    def __init__(self, table: dict[int, Any], key: int) -> None:
        self._cache, self._job = table, key
        table[key] = self


def test_a_kept_message_runs_while_the_pool_tracks_its_job_and_until_acknowledged() -> None:
    table: dict[int, Any] = {}
    request, job = Request("a"), Job(table, 1)
    request._apply_result = weakref.ref(job)
    kept = Kept(message=None, run_id=None, request=weakref.ref(request))
    assert Ledger.still_running(kept)
    del table[1]  # the pool forgot it: no ack will ever come
    assert not Ledger.still_running(kept)
    table[1] = job
    request.acknowledged = True
    assert not Ledger.still_running(kept)
    assert not Ledger.still_running(Kept(None, None, None))  # request gone


def test_without_a_pool_job_table_a_task_runs_while_it_is_active() -> None:
    request = Request("t")  # threads/solo: no billiard job to look at
    kept = Kept(message=None, run_id=None, request=weakref.ref(request))
    assert not Ledger.still_running(kept)
    state.active_requests.add(request)
    try:
        assert Ledger.still_running(kept)
    finally:
        state.active_requests.discard(request)


def test_the_owner_names_the_worker_and_the_process() -> None:
    owner = Ledger("w1@host").owner
    name, pid, suffix = owner.rsplit(".", 2)
    assert (name, int(pid), len(suffix)) == ("w1@host", os.getpid(), 6)
    assert Ledger("w1@host").owner != owner


def test_kept_messages_are_forgotten_by_their_ack() -> None:
    ledger = Ledger("w")
    ledger.keep("t1", "m1", "run")
    ledger.keep("t2", "m2", None)
    ledger.forget("t1")
    assert list(ledger.kept()) == ["t2"] and ledger.kept()["t2"].message == "m2"


def test_data_is_lost_only_when_both_runs_are_known_and_differ() -> None:
    assert lost_since("a", "b") and not lost_since("a", "a")
    assert not lost_since(None, "b") and not lost_since("a", None)


@pytest.mark.parametrize(("visibility", "due_after"), [(3600, 1200), (3, 1)])
def test_leases_are_renewed_every_third_of_the_visibility_timeout(
    visibility: float, due_after: float
) -> None:
    """Not at every heartbeat: renewing 10 000 leases takes the consumer's GIL ~70 ms."""
    app = Celery("leases", set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": visibility}
    leases = Reclaimer(app, FetchOptions(), Ledger("w"))
    assert leases._renewal_due()  # never renewed
    leases._renewed = time.monotonic() - 0.8 * due_after
    assert not leases._renewal_due()
    leases._renewed = time.monotonic() - due_after
    assert leases._renewal_due()
