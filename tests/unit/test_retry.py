"""ResilientTask's tiers without a Redis server: direct calls, eager apply, a closed port."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis.exceptions as rex
from celery import Celery, Task
from celery.exceptions import Reject

from celery_resilience import ResilientTask, signals


@pytest.fixture
def app() -> Iterator[Celery]:
    # Port 1 on loopback: every publish gets a real "connection refused".
    app = Celery("unit", broker="redis://127.0.0.1:1/0", set_as_current=False,
                 task_cls=ResilientTask)  # fmt: skip
    app.conf.update(
        resilience_inprocess_backoff=0.001,
        resilience_inprocess_backoff_max=0.002,
        resilience_publish_budget=0.05,
        task_publish_retry=False,
        broker_connection_retry=False,
        broker_connection_timeout=0.5,
    )
    yield app


def flaky(failures: list[BaseException]) -> Any:
    calls: list[int] = []

    def body(*args: Any, **kwargs: Any) -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "ok"

    body.calls = calls  # type: ignore[attr-defined]
    return body


def test_transient_errors_rerun_in_process_and_are_reported(
    app: Celery, signals_seen: list
) -> None:
    body = flaky([rex.ConnectionError("Connection reset by peer"), ConnectionResetError()])
    task = app.task(body, name="t.flaky", shared=False)
    assert task() == "ok"
    assert len(body.calls) == 3
    assert [(e, kw["attempt"], kw["tier"]) for e, _, kw in signals_seen] == [
        ("transient_error", 1, "inprocess"),
        ("transient_error", 2, "inprocess"),
    ]
    assert str(signals_seen[0][2]["cause"]) == "Connection reset by peer"


@pytest.mark.parametrize(
    "error",
    [rex.ResponseError("WRONGTYPE Operation against a key"), rex.AuthenticationError("bad")],
    ids=["wrongtype", "auth"],
)
def test_terminal_errors_fail_on_first_attempt(app: Celery, signals_seen: list, error: Any) -> None:
    body = flaky([error])
    task = app.task(body, name="t.terminal", shared=False)
    result = task.apply()
    assert result.state == "FAILURE" and result.result is error
    assert len(body.calls) == 1 and signals_seen == []


def test_eager_retries_stop_at_the_limit_with_the_original_error(
    app: Celery, signals_seen: list
) -> None:
    reset = rex.ConnectionError("reset")
    hook_calls: list[tuple[Any, ...]] = []

    class Task_(ResilientTask):
        def on_retries_exhausted(self, exc: Any, task_id: Any, args: Any, kwargs: Any) -> None:
            hook_calls.append((exc, task_id, args, kwargs))

    body = flaky([reset] * 10)
    task = app.task(body, name="t.exhaust", base=Task_, inprocess_budget=0, max_retries=2,
                    shared=False)  # fmt: skip
    result = task.apply(args=(7,), task_id="job-7")
    assert result.state == "FAILURE" and result.result is reset
    assert len(body.calls) == 3  # the first run and two retries
    assert [e for e, _, _ in signals_seen].count("retries_exhausted") == 1
    assert hook_calls == [(reset, "job-7", (7,), {})]


def retry_in_worker(task: Any) -> Reject:
    """Call ``task.retry`` as a worker delivery would; the Reject it raises."""
    task.push_request(id="abc", retries=0, called_directly=False, is_eager=False,
                      delivery_info={"routing_key": "celery", "priority": 0})  # fmt: skip
    try:
        with pytest.raises(Reject) as info:
            task.retry(exc=rex.ConnectionError("reset"))
    finally:
        task.pop_request()
    return info.value


def test_failed_retry_publish_requeues_instead_of_dropping(app: Celery, signals_seen: list) -> None:
    task = app.task(flaky([]), name="t.publish", shared=False)
    assert retry_in_worker(task).requeue is True
    assert [e for e, _, _ in signals_seen] == ["retry_publish_failed"]


def test_control_plain_celery_drops_the_task_when_retry_publish_fails(app: Celery) -> None:
    task = app.task(flaky([]), name="t.plain", base=Task, shared=False)
    assert retry_in_worker(task).requeue is False  # Celery's own: the message is dropped


def test_a_broken_receiver_never_breaks_the_task(app: Celery) -> None:
    def broken(sender: Any, **kw: Any) -> None:
        raise RuntimeError("receiver bug")

    signals.transient_error.connect(broken)
    try:
        task = app.task(flaky([ConnectionResetError()]), name="t.recv", shared=False)
        assert task() == "ok"
    finally:
        signals.transient_error.disconnect(broken)


def test_autoretry_options_still_work_beside_resilient_task(app: Celery) -> None:
    body = flaky([KeyError("x")] * 5)
    task = app.task(body, name="t.auto", autoretry_for=(KeyError,), max_retries=1,
                    retry_backoff=True, shared=False)  # fmt: skip
    result = task.apply()
    assert result.state == "FAILURE" and isinstance(result.result, KeyError)
    assert len(body.calls) == 2
