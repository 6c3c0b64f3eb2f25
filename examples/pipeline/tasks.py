"""The job's task in three variants, sharing one body.

- ``process_image``: ResilientTask (celery-resilience). Transient errors propagate from
  the state layer and are retried; the job fails only when its state is really gone or
  retries are exhausted.
- ``process_image_naive``: seed 001 as it was: a RedisError becomes "state missing" and
  the job is failed and wiped on the spot.
- ``process_image_autoretry``: seed 001's proposed fix with plain Celery
  (``autoretry_for=(RedisError, ConnectionError)``, backoff, jitter, 5 retries).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

import redis
from celery import Celery, Task

from celery_resilience import ResilientTask

from . import joblog
from .state import JobState, Progress

logger = logging.getLogger(__name__)

#: Seconds of simulated work per image (the demo and tests set PIPELINE_WORK_SECONDS).
WORK_SECONDS = float(os.environ.get("PIPELINE_WORK_SECONDS", "0"))

Update = Callable[[JobState, int, str], Optional[Progress]]


def update(state: JobState, image_id: int, stage: str) -> Progress | None:
    """The fixed state call: transient errors propagate to the task."""
    return state.update([image_id], stage)


def naive_update(state: JobState, image_id: int, stage: str) -> Progress | None:
    """Seed 001's update_state: a transient RedisError is reported as "state missing"."""
    try:
        return state.update([image_id], stage)
    except redis.RedisError as exc:
        logger.error("Redis error updating job %s state: %s", state.job_id, exc)
        return None


def fail_job(state: JobState, reason: str) -> None:
    """Seed 001's _fail_job: mark FAILURE, record where it stood, wipe the state."""
    if state.status() == "FAILED":
        return
    state.client.set(state.key("done_at_end"), state.done("results"))
    state.set_status("FAILED")
    state.wipe()
    joblog.write(state.job_id, "ERROR", f"Job {state.job_id} marked as FAILURE: {reason}")


def process(state: JobState, image_id: int, update: Update, missing: str) -> str:
    """One image: count it in stage "process", save its results, count it in "results"."""
    if update(state, image_id, "process") is None:
        fail_job(state, missing)
        return "failed"
    time.sleep(WORK_SECONDS)  # the model's work between the two stages
    state.client.hset(state.key("results"), str(image_id), "detections")
    progress = update(state, image_id, "results")
    if progress is None:
        fail_job(state, missing)
        return "failed"
    if progress.remaining == 0:
        state.client.set(state.key("done_at_end"), progress.done)
        state.set_status("SUCCESS")
        joblog.write(state.job_id, "INFO", f"Job finished: {progress.done}/{progress.total}")
    return "done"


GONE = "Job state keys not found in Redis (job may have been cleaned up concurrently)"


class PipelineTask(ResilientTask):
    """ResilientTask whose exhausted retries fail the job with the real cause."""

    def on_retries_exhausted(
        self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        job_id = kwargs.get("job_id", args[0] if args else None)
        fail_job(self.app.job_state(job_id), f"gave up after retries: {exc!r}")


def register(app: Celery) -> None:
    """Add the three task variants to ``app``."""

    @app.task(name="pipeline.process_image", base=PipelineTask, shared=False)
    def process_image(job_id: int, image_id: int) -> str:
        return process(app.job_state(job_id), image_id, update, GONE)  # type: ignore[attr-defined]

    @app.task(name="pipeline.process_image_naive", base=Task, shared=False)
    def process_image_naive(job_id: int, image_id: int) -> str:
        state = app.job_state(job_id)  # type: ignore[attr-defined]
        return process(state, image_id, naive_update, "Redis state missing for job")

    @app.task(
        name="pipeline.process_image_autoretry", base=Task, shared=False,
        autoretry_for=(redis.RedisError, ConnectionError), retry_backoff=True,
        retry_backoff_max=30, retry_jitter=True, max_retries=5,
    )  # fmt: skip
    def process_image_autoretry(job_id: int, image_id: int) -> str:
        return process(app.job_state(job_id), image_id, update, GONE)  # type: ignore[attr-defined]
