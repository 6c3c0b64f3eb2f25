"""The pipeline's Celery app: ``celery -A examples.pipeline.app worker``.

Configured from the environment (the demo and the tests set these):
``PIPELINE_BROKER_URL`` (default ``redis://127.0.0.1:6379/0``), ``PIPELINE_STATE_URL``
(the job state's Redis; default: the broker), ``PIPELINE_LOG_DIR`` (job logs).
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from celery_resilience import ResilientTask, install, signals

from . import joblog, tasks
from .state import JobState


def create_app(broker_url: str, state_url: str, *, idempotent: bool = True,
               **conf: Any) -> Celery:  # fmt: skip
    """A pipeline app: the two lines of celery-resilience, the tasks, the job-log hookup.

    ``idempotent=False`` swaps in a counter that counts every write (the control that
    shows why retried writes must be idempotent).
    """
    app = Celery("pipeline", broker=broker_url, task_cls=ResilientTask, set_as_current=False)
    install(app)
    app.conf.update(
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        **conf,
    )
    # redis-py gives from_url pools no retries: a reset reaches the application, as in
    # the incident (a client with its own retries would hide it).
    client = redis.Redis.from_url(state_url)
    app.job_state = lambda job_id: JobState(  # type: ignore[attr-defined]
        client, int(job_id), idempotent=idempotent
    )
    tasks.register(app)
    signals.transient_error.connect(transient_to_job_log, weak=False)
    return app


def transient_to_job_log(task: Any, *, cause: BaseException, attempt: int, tier: str,
                         args: Any, kwargs: Any, **_: Any) -> None:  # fmt: skip
    """Write each transient cause into the job's own log (the seed 001 blind spot)."""
    job_id = (kwargs or {}).get("job_id", args[0] if args else None)
    if job_id is None:
        return
    action = "retrying in-process" if tier == "inprocess" else "retrying via Celery"
    joblog.write(
        int(job_id), "WARNING",
        f"transient Redis error, {action} (attempt {attempt}): "
        f"{type(cause).__name__}: {cause}",
    )  # fmt: skip


def submit_job(app: Celery, job_id: int, n_images: int, variant: str = "") -> None:
    """Create the job's state and enqueue one task per image, in order."""
    app.job_state(job_id).create(range(1, n_images + 1))  # type: ignore[attr-defined]
    name = "pipeline.process_image" + (f"_{variant}" if variant else "")
    for image_id in range(1, n_images + 1):
        app.send_task(name, kwargs={"job_id": job_id, "image_id": image_id})


def _conf_from_env() -> dict[str, Any]:
    """Extra settings the demo and tests pass to a worker subprocess."""
    conf: dict[str, Any] = {
        # CELERY_RESILIENCE_MAX_RETRIES=3 -> resilience_max_retries (Django-style names).
        key[len("CELERY_") :].lower(): value
        for key, value in os.environ.items()
        if key.startswith("CELERY_RESILIENCE_")
    }
    if "PIPELINE_VISIBILITY_TIMEOUT" in os.environ:
        timeout = int(os.environ["PIPELINE_VISIBILITY_TIMEOUT"])
        # A short visibility timeout brings back what a lost connection left unacked;
        # sweep every second (kombu >= 5.6 options; older kombu ignores them).
        conf["broker_transport_options"] = {
            "visibility_timeout": timeout,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        }
    return conf


_broker = os.environ.get("PIPELINE_BROKER_URL", "redis://127.0.0.1:6379/0")
app = create_app(_broker, os.environ.get("PIPELINE_STATE_URL", _broker), **_conf_from_env())
