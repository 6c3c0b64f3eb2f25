"""The prefork pool, keeping its jobs across a lost broker connection.

On a lost connection Celery's consumer calls ``AsynPool.flush()``, which forgets the
pool's jobs ("they can't be acked anyway": with kombu alone the ack would crash on the
collected transport): Celery <= 5.6 all of them, 5.7 those not yet accepted, even when
already written to a busy child, which will run them. Such a task was never acked, and
kombu ran it again after the visibility timeout. With the plugin's transport the ack
works (its channel keeps its connection info), so :class:`AsynPool` keeps every job a
child has or is being sent; only the ones still waiting in the outbound buffer are
dropped, and their messages handed back.

The worker's delivery step selects :class:`TaskPool` where the worker would run Celery's
own prefork pool (``-P prefork``, the default).
"""

from __future__ import annotations

from typing import Any

from celery.concurrency import asynpool, prefork


class AsynPool(asynpool.AsynPool):  # type: ignore[misc]  # celery ships no type stubs
    """Celery's prefork pool whose ``flush`` keeps the jobs a child has."""

    def flush(self) -> Any:
        sent = {key: job for key, job in self._cache.items() if _sent(self, job)}
        try:
            return super().flush()
        finally:
            for key, job in sent.items():
                if not job.ready() and _child_alive(self, job):
                    self._cache.setdefault(key, job)


def _sent(pool: Any, job: Any) -> bool:
    if getattr(job, "_accepted", False):
        return True
    # With synack Celery cancels (NACKs) unaccepted jobs: the child will not run them.
    return not getattr(pool, "synack", False) and getattr(job, "_write_to", None) is not None


def _child_alive(pool: Any, job: Any) -> bool:
    """Whether the child that has ``job`` still lives: a dead one reports nothing, ever.

    A child that died during the flush was already reaped: the pool then reports the job
    as lost only if it is still in the table, which it no longer was. Put back, it would
    stay "running" for good, and its message with it.
    """
    pid = getattr(job, "_worker_pid", None)
    if pid is None:
        proc = getattr(job, "_write_to", None)
        pid = getattr(proc, "pid", None)
    if pid is None:
        return True  # accepted by a child we cannot name: the pool's own checks apply
    return any(getattr(p, "pid", None) == pid and p.exitcode is None for p in pool._pool)


class TaskPool(prefork.TaskPool):  # type: ignore[misc]
    """Celery's prefork ``TaskPool`` with :class:`AsynPool`."""

    Pool = AsynPool
