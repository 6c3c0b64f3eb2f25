"""Seed 001 end to end: an 840-image job through a reset and a Redis restart.

Each "fixed" test has its control: the naive task of the incident, a counter that counts
every write, plain Celery's autoretry. Job state is read back from Redis; nothing here
measures time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from celery import Celery

from examples.pipeline import joblog
from examples.pipeline.app import create_app, submit_job
from tests.bench.proxy import ResetProxy
from tests.bench.redis_server import RedisServer
from tests.bench.workers import PreforkWorker, inprocess_worker

pytestmark = pytest.mark.integration

N = 840
REPO = str(Path(__file__).resolve().parents[2])


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


def run_job(app: Celery, variant: str = "", *, n: int = N, job_id: int = 1) -> dict[str, Any]:
    """Run one job on an in-process solo worker (images in order) until it settles."""
    state = app.job_state(job_id)  # type: ignore[attr-defined]
    with inprocess_worker(app, pool="solo"):
        while state.status() == "STARTED":
            time.sleep(0.05)
    return {
        "status": state.status(),
        "done_at_end": int(state.client.get(state.key("done_at_end")) or 0),
        "done": {s: state.done(s) for s in ("process", "results")},
        "log": joblog.read(job_id),
    }


def transient_lines(log: list[str]) -> list[str]:
    return [line for line in log if "transient Redis error" in line]


def test_control_naive_task_fails_the_job_at_506_on_one_reset(pipeline: Any) -> None:
    app, proxy = pipeline()
    submit_job(app, 1, N, "naive")
    proxy.arm(rb"pending:process", nth=507, when="before")
    result = run_job(app, "naive")
    assert proxy.resets == 1
    assert (result["status"], result["done_at_end"]) == ("FAILED", 506)
    assert result["log"][-1].endswith("Job 1 marked as FAILURE: Redis state missing for job")
    assert transient_lines(result["log"]) == []  # the real cause never reached the job log


def test_resilient_job_finishes_840_through_one_reset_with_the_cause_in_its_log(
    pipeline: Any,
) -> None:
    app, proxy = pipeline()
    submit_job(app, 1, N)
    proxy.arm(rb"pending:process", nth=507, when="before")
    result = run_job(app)
    assert proxy.resets == 1
    assert (result["status"], result["done_at_end"]) == ("SUCCESS", N)
    assert result["done"] == {"process": N, "results": N}
    lines = transient_lines(result["log"])
    assert len(lines) == 1 and "Connection reset by peer" in lines[0], result["log"]
    assert "retrying in-process (attempt 1)" in lines[0]


def test_reset_after_apply_is_not_double_counted(pipeline: Any) -> None:
    app, proxy = pipeline()
    submit_job(app, 1, N)
    proxy.arm(rb"pending:results", nth=300, when="after")  # applied, then the reply is lost
    result = run_job(app)
    assert proxy.resets == 1
    assert (result["status"], result["done"]) == ("SUCCESS", {"process": N, "results": N})


def test_control_counting_writes_double_count_a_reset_after_apply(pipeline: Any) -> None:
    app, proxy = pipeline(idempotent=False)
    submit_job(app, 1, N)
    proxy.arm(rb"pending:results", nth=300, when="after")
    result = run_job(app)
    assert proxy.resets == 1
    # The retry re-runs the body: both stages count image 300 twice.
    assert result["done"] == {"process": N + 1, "results": N + 1}


# -- Redis restart: broker and job state on the same redis-server ------------------------------

RESTART_N = 200


def run_through_restart(
    server: RedisServer, variant: str, job_logs: Path, **settings: str
) -> dict[str, Any]:
    """A prefork worker runs the job; Redis goes down for 3.5 s once 50 images are done."""
    env = {
        **{f"CELERY_RESILIENCE_{k.upper()}": v for k, v in settings.items()},
        "PIPELINE_BROKER_URL": server.url(0),
        "PIPELINE_STATE_URL": server.url(0),
        "PIPELINE_LOG_DIR": str(job_logs),
        # Work between the stages keeps tasks in flight when Redis goes down.
        "PIPELINE_WORK_SECONDS": "0.05",
        # What a lost connection left unacked comes back within seconds, not an hour.
        "PIPELINE_VISIBILITY_TIMEOUT": "20",
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    app = create_app(server.url(0), server.url(0))
    submit_job(app, 1, RESTART_N, variant)
    client = server.client()
    with PreforkWorker("examples.pipeline.app", concurrency=2, env=env, cwd=REPO) as worker:
        worker.start()
        _wait(lambda: int(client.get("job:1:done:results") or 0) >= 50, timeout=60)
        server.restart(down_for=3.5, save=True)
        settled = _wait(lambda: _settled(client), timeout=90, steady=3.0)
        alive = worker.alive
        log = worker.log
    return {
        "handed_back": log.count("the original message is requeued instead of dropped"),
        "dropped": log.count("reject requeue=False"),
        "settled": settled,
        "alive": alive,
        "status": client.get("job:1:status"),
        "done": int(client.get("job:1:done:results") or 0),
        "waiting": client.llen("celery") + client.hlen("unacked"),
    }


def _settled(client: Any) -> bool:
    try:
        if client.get("job:1:status") == b"SUCCESS":
            return True
        return client.llen("celery") == 0 and client.hlen("unacked") == 0
    except Exception:  # Redis still coming back
        return False


def _wait(predicate: Callable[[], bool], *, timeout: float, steady: float = 0.0) -> bool:
    """Poll ``predicate`` until it has held for ``steady`` seconds (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    since = None
    while time.monotonic() < deadline:
        if predicate():
            since = since or time.monotonic()
            if time.monotonic() - since >= steady:
                return True
        else:
            since = None
        time.sleep(0.1)
    return False


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
    result = run_through_restart(private_redis, "", job_logs, **settings)
    assert result["alive"] and result["settled"]
    assert (result["status"], result["done"]) == (b"SUCCESS", RESTART_N)
    assert result["dropped"] == 0
    if settings:
        assert result["handed_back"] >= 1, "the failed-publish path never ran"


@pytest.mark.slow
@pytest.mark.fault
def test_control_plain_autoretry_loses_tasks_in_a_redis_restart(
    private_redis: RedisServer, job_logs: Path
) -> None:
    result = run_through_restart(private_redis, "autoretry", job_logs)
    assert result["alive"] and result["settled"]
    lost = RESTART_N - result["done"] - result["waiting"]
    assert result["status"] == b"STARTED" and lost >= 1, result
    assert result["dropped"] >= lost  # each lost task is one of Celery's Reject(requeue=False)
