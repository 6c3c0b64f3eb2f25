"""Seed 001 end to end: an 840-image job through a reset and a Redis restart.

Each "fixed" test has its control: the naive task of the incident, a counter that counts
every write, plain Celery's autoretry. Job state is read back from Redis; nothing here
measures time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from celery import Celery

from examples.pipeline.app import create_app, submit_job
from examples.pipeline.scenarios import Outcome, run_inprocess, run_through_restart
from tests.bench.proxy import ResetProxy
from tests.bench.redis_server import RedisServer

pytestmark = pytest.mark.integration

N = 840


@pytest.fixture(autouse=True)
def job_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PIPELINE_LOG_DIR", str(tmp_path / "jobs"))
    return tmp_path / "jobs"


@pytest.fixture
def pipeline(
    redis_url: str, redis_server: Any, reset_proxy: Callable[[Any], ResetProxy]
) -> Iterator[Callable[..., tuple[Celery, ResetProxy]]]:
    """An app whose broker is the session Redis and whose job state goes via a proxy."""

    def make(**kwargs: Any) -> tuple[Celery, ResetProxy]:
        proxy = reset_proxy(redis_server)
        return create_app(redis_url, proxy.url(0), **kwargs), proxy

    yield make


def run_job(app: Celery) -> Outcome:
    return run_inprocess(app, N)


def test_control_naive_task_fails_the_job_at_506_on_one_reset(pipeline: Any) -> None:
    app, proxy = pipeline()
    submit_job(app, 1, N, "naive")
    proxy.arm(rb"pending:process", nth=507, when="before")
    result = run_job(app)
    assert proxy.resets == 1
    assert (result.status, result.done) == ("FAILED", 506)
    assert result.log[-1].endswith("Job 1 marked as FAILURE: Redis state missing for job")
    assert result.transient_lines == []  # the real cause never reached the job log


def test_resilient_job_finishes_840_through_one_reset_with_the_cause_in_its_log(
    pipeline: Any,
) -> None:
    app, proxy = pipeline()
    submit_job(app, 1, N)
    proxy.arm(rb"pending:process", nth=507, when="before")
    result = run_job(app)
    assert proxy.resets == 1
    assert (result.status, result.done) == ("SUCCESS", N)
    assert result.counters == {"process": N, "results": N}
    lines = result.transient_lines
    assert len(lines) == 1 and "Connection reset by peer" in lines[0], result.log
    assert "retrying in-process (attempt 1)" in lines[0]


def test_reset_after_apply_is_not_double_counted(pipeline: Any) -> None:
    app, proxy = pipeline()
    submit_job(app, 1, N)
    proxy.arm(rb"pending:results", nth=300, when="after")  # applied, then the reply is lost
    result = run_job(app)
    assert proxy.resets == 1
    assert (result.status, result.counters) == ("SUCCESS", {"process": N, "results": N})


def test_control_counting_writes_double_count_a_reset_after_apply(pipeline: Any) -> None:
    app, proxy = pipeline(idempotent=False)
    submit_job(app, 1, N)
    proxy.arm(rb"pending:results", nth=300, when="after")
    result = run_job(app)
    assert proxy.resets == 1
    # The retry re-runs the body: both stages count image 300 twice.
    assert result.counters == {"process": N + 1, "results": N + 1}


# -- Redis restart: broker and job state on the same redis-server ------------------------------

RESTART_N = 200


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.parametrize(
    "settings",
    [
        {},
        # No in-process tier: every transient error becomes a Celery retry whose publish
        # fails while Redis is down; the message must be handed back, not dropped.
        {"inprocess_budget": "0", "publish_budget": "0.5", "retry_backoff": "0.2"},
    ],
    ids=["inprocess-tier", "celery-tier-failed-publish"],
)
def test_resilient_job_completes_through_a_redis_restart(
    private_redis: RedisServer, job_logs: Path, settings: dict[str, str]
) -> None:
    result = run_through_restart(
        private_redis, "", n=RESTART_N, log_dir=str(job_logs), settings=settings
    )
    assert result.worker_alive
    assert (result.status, result.done, result.lost, result.dropped) == ("SUCCESS", RESTART_N, 0, 0)
    if settings:
        assert result.handed_back >= 1, "the failed-publish path never ran"


@pytest.mark.slow
@pytest.mark.fault
def test_control_plain_autoretry_loses_tasks_in_a_redis_restart(
    private_redis: RedisServer, job_logs: Path
) -> None:
    result = run_through_restart(private_redis, "autoretry", n=RESTART_N, log_dir=str(job_logs))
    assert result.worker_alive
    assert result.status == "STARTED" and result.lost >= 1, result
    assert result.dropped >= result.lost  # each lost task is a Reject(requeue=False)
