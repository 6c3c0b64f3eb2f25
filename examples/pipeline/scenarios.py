"""Seed 001's scenarios, run for real: shared by the demo and the integration tests.

``run_inprocess`` runs a job on an in-process solo worker (images strictly in order, so
"the N-th state read" is image N's). ``run_through_restart`` runs a job on a real
prefork worker and restarts its redis-server (broker and job state) mid-job.
Both return an :class:`Outcome`; neither asserts anything.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from celery import Celery

from tests.bench.redis_server import RedisServer
from tests.bench.workers import PreforkWorker, inprocess_worker

from . import joblog
from .app import create_app, submit_job

REPO = str(Path(__file__).resolve().parents[2])
Progress = Optional[Callable[[int, int], None]]


@dataclasses.dataclass
class Outcome:
    """How a job ended, read back from Redis and the job log."""

    status: str
    done: int  # images counted in the last stage when the job ended
    counters: dict[str, int]
    log: list[str]
    lost: int = 0  # images neither done nor waiting in the queue/unacked
    worker_alive: bool = True
    handed_back: int = 0  # retries whose publish failed and were requeued (ResilientTask)
    dropped: int = 0  # Celery's Reject(requeue=False) on a failed retry publish
    seconds: float = 0.0

    @property
    def transient_lines(self) -> list[str]:
        return [line for line in self.log if "transient Redis error" in line]


def run_inprocess(app: Celery, n: int, job_id: int = 1, progress: Progress = None) -> Outcome:
    """Run job ``job_id`` (already submitted) on a solo worker until it ends."""
    state = app.job_state(job_id)  # type: ignore[attr-defined]
    started = time.monotonic()
    with inprocess_worker(app, pool="solo"):
        while state.status() == "STARTED":
            _report(progress, lambda: state.done("results"), n)
            time.sleep(0.05)
    return _outcome(app, job_id, time.monotonic() - started)


def run_through_restart(
    server: RedisServer,
    variant: str,
    *,
    n: int = 200,
    restart_after: int = 50,
    down_for: float = 3.5,
    log_dir: str,
    settings: dict[str, str] | None = None,
    progress: Progress = None,
) -> Outcome:
    """A prefork worker (``-c 2``) runs the job; Redis goes down once ``restart_after``
    images are done, for ``down_for`` seconds, and comes back with its data."""
    env = {
        **{f"CELERY_RESILIENCE_{k.upper()}": v for k, v in (settings or {}).items()},
        "PIPELINE_BROKER_URL": server.url(0),
        "PIPELINE_STATE_URL": server.url(0),
        "PIPELINE_LOG_DIR": log_dir,
        # Work between the stages keeps tasks in flight when Redis goes down.
        "PIPELINE_WORK_SECONDS": "0.05",
        # What a lost connection left unacked comes back within seconds, not an hour.
        "PIPELINE_VISIBILITY_TIMEOUT": "20",
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    app = create_app(server.url(0), server.url(0))
    submit_job(app, 1, n, variant)
    client = server.client()
    done = lambda: int(client.get("job:1:done:results") or 0)  # noqa: E731
    started = time.monotonic()
    with PreforkWorker("examples.pipeline.app", concurrency=2, env=env, cwd=REPO) as worker:
        _wait(lambda: _report(progress, done, n) >= restart_after, timeout=60)
        server.restart(down_for=down_for, save=True)
        _wait(lambda: _settled(client, progress, n), timeout=90, steady=3.0)
        alive, log = worker.alive, worker.log
    outcome = _outcome(app, 1, time.monotonic() - started)
    waiting = client.llen("celery") + client.hlen("unacked")
    return dataclasses.replace(
        outcome,
        lost=n - outcome.done - waiting if outcome.status != "SUCCESS" else 0,
        worker_alive=alive,
        handed_back=log.count("the original message is requeued instead of dropped"),
        dropped=log.count("reject requeue=False"),
    )


def _outcome(app: Celery, job_id: int, seconds: float) -> Outcome:
    state = app.job_state(job_id)  # type: ignore[attr-defined]
    status = state.status()
    counters = {s: state.done(s) for s in ("process", "results")}
    done_at_end = state.client.get(state.key("done_at_end"))
    done = int(done_at_end) if done_at_end is not None else counters["results"]
    return Outcome(status, done, counters, joblog.read(job_id), seconds=seconds)


def _report(progress: Progress, done: Callable[[], int], n: int) -> int:
    try:
        value = done()
    except Exception:  # Redis is down: nothing to report
        return -1
    if progress is not None:
        progress(value, n)
    return value


def _settled(client: Any, progress: Progress, n: int) -> bool:
    try:
        _report(progress, lambda: int(client.get("job:1:done:results") or 0), n)
        if client.get("job:1:status") == b"SUCCESS":
            return True
        return bool(client.llen("celery") == 0 and client.hlen("unacked") == 0)
    except Exception:  # Redis still coming back
        return False


def _wait(predicate: Callable[[], bool], *, timeout: float, steady: float = 0.0) -> bool:
    """Poll ``predicate`` until it has held for ``steady`` seconds (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    since: float | None = None
    while time.monotonic() < deadline:
        if predicate():
            since = since or time.monotonic()
            if time.monotonic() - since >= steady:
                return True
        else:
            since = None
        time.sleep(0.1)
    return False
