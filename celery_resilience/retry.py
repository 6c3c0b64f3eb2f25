"""ResilientTask: transient Redis/connection errors are retried, terminal ones are not.

Two tiers, both driven by :func:`~celery_resilience.transient.is_transient`:

1. **In-process.** The task body runs again in the same worker process after an
   exponential, fully jittered wait, while the message stays unacked (``acks_late``).
   Nothing is re-published, so a 150 ms connection reset costs well under a second.
2. **Celery retry.** Once the in-process budget is spent, :meth:`Task.retry` publishes a
   new message with exponential backoff, full jitter, a cap and a limit, to the queue,
   exchange/routing key and priority stamped when the task was first published
   (:mod:`~celery_resilience.routing`; Celery alone reuses those of the delivery).

Celery answers a retry whose *publish* fails with ``Reject(requeue=False)``: the task is
dropped. :meth:`ResilientTask.retry` instead retries the publish for a short budget and
then rejects the original message *with* requeue, so the broker delivers it again.

Precedence of every option: ``retry(...)`` arguments > task attributes (class attributes
or decorator kwargs) > ``resilience_*`` settings > the documented defaults.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

from celery import Task
from celery.exceptions import Reject, Retry

from . import routing, signals
from .config import settings_for
from .policy import RetryPolicy, backoff

logger = logging.getLogger(__name__)

__all__ = ["ResilientTask", "RetryPolicy", "backoff"]


class ResilientTask(Task):  # type: ignore[misc]  # celery ships no type stubs
    """A Task base class that survives transient Redis and connection errors.

    Use it as ``Celery(..., task_cls=ResilientTask)`` or ``@app.task(base=ResilientTask)``.
    Every option below may be set as a class attribute or a decorator kwarg; ``None``
    means "the ``resilience_*`` setting of the same name".

    Celery's own names are honoured too, with the same meaning as for ``autoretry_for``
    (they are not declared here because Celery's autoretry reads them with ``float()``):
    ``retry_backoff`` (base of the tier-2 backoff in seconds; ``True``: the setting),
    ``retry_backoff_max`` (its cap in seconds) and ``retry_jitter`` (full jitter on/off).
    """

    #: The message is acked only once the task has really finished, so a worker that
    #: dies mid-task (or a task waiting in tier 1) never loses it.
    acks_late = True
    #: A child killed mid-task (OOM, SIGKILL) hands its message back instead of acking it.
    reject_on_worker_lost = True

    #: Seconds tier 1 may spend re-running the body in-process; 0 turns tier 1 off.
    inprocess_budget: float | None = None
    #: First tier-1 wait in seconds (doubles per attempt, full jitter) and its cap.
    inprocess_backoff: float | None = None
    inprocess_backoff_max: float | None = None
    #: Celery retries after tier 1. ``None`` here means the setting (default 5), not
    #: "forever" as on a plain Task.
    max_retries: int | None = None
    #: Seconds a failed retry publish is retried before the message is handed back.
    publish_budget: float | None = None
    #: Extra exception classes to retry / never to retry, on top of the settings.
    transient_errors: tuple[type[BaseException], ...] = ()
    terminal_errors: tuple[type[BaseException], ...] = ()

    #: The task body (Celery sets it); declared for the type checker only.
    run: Callable[..., Any]

    def __init__(self) -> None:
        super().__init__()
        # Wrap run() on the instance, as Celery's own autoretry does: the worker calls
        # task.run directly, and a second super().__call__ in a custom __call__ would run
        # without the delivery's request context (celery/app/trace.py stack protection).
        # _resilience_run keeps the unwrapped body and guards against wrapping twice.
        if not hasattr(self, "_resilience_run"):
            self._resilience_run = self.run
            self.run = _resilient_run(self, self.run)

    @property
    def resilience_policy(self) -> RetryPolicy:
        """This task's effective options; resolved on first use and cached."""
        policy: RetryPolicy | None = self.__dict__.get("_resilience_policy")
        if policy is None:
            policy = RetryPolicy.resolve(self, settings_for(self._get_app()))
            self.__dict__["_resilience_policy"] = policy
        return policy

    # -- hooks ---------------------------------------------------------------------

    def on_transient_error(self, exc: BaseException, attempt: int, tier: str) -> None:
        """Called for every transient error, before it is retried. Override to log it.

        Args:
            exc: the exception the body raised (its cause chain holds the transient one).
            attempt: 1 for the first transient error of this delivery.
            tier: ``"inprocess"`` (the body runs again here) or ``"celery"`` (a retry
                message is published).
        """

    def on_retries_exhausted(
        self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Called once when the retry limit runs out; the task then fails with ``exc``.

        Override it to fail the job for real (this is where seed 001's ``_fail_job``
        belongs). An exception raised here is logged; the task still fails with ``exc``.
        """

    # -- the tiers -----------------------------------------------------------------

    def _run_tiers(self, run: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        policy = self.resilience_policy
        started = 0.0
        attempt = 0
        while True:
            try:
                return run(*args, **kwargs)
            except Exception as exc:
                cause = policy.transient_cause(exc)
                if cause is None:
                    raise
                attempt += 1
                now = time.monotonic()
                started = started or now
                delay = backoff(policy.inprocess_backoff, attempt, policy.inprocess_backoff_max)
                in_process = now + delay - started <= policy.inprocess_budget
                self._report_transient(exc, cause, attempt, "inprocess" if in_process else "celery")
                if not in_process:
                    raise self.retry(exc=exc) from exc
                time.sleep(delay)

    def _report_transient(
        self, exc: BaseException, cause: BaseException, attempt: int, tier: str
    ) -> None:
        request = self.request
        logger.warning(
            "resilience: %s[%s] transient error (attempt %d, %s tier): %s: %s",
            self.name, request.id, attempt, tier, type(exc).__name__, exc,
        )  # fmt: skip
        try:
            self.on_transient_error(exc, attempt, tier)
        except Exception:
            logger.exception("resilience: %s.on_transient_error raised; ignored", self.name)
        signals.send(
            signals.transient_error, self,
            exc=exc, cause=cause, attempt=attempt,
            tier=tier, task_id=request.id, args=request.args, kwargs=request.kwargs,
        )  # fmt: skip

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Celery's ``retry`` with the policy's backoff and limit, and a safe publish.

        Arguments are Celery's. Left as ``None``, ``countdown`` comes from the policy's
        exponential backoff and ``max_retries`` from the policy's limit.
        """
        policy = self.resilience_policy
        request = self.request
        if max_retries is None:
            max_retries = policy.max_retries
        if countdown is None and eta is None:
            countdown = backoff(
                policy.retry_backoff, request.retries + 1, policy.retry_backoff_max,
                policy.retry_jitter,
            )  # fmt: skip
        if exc is not None and request.retries >= max_retries and not request.called_directly:
            self._retries_exhausted(exc)
        # Back to the stamped origin (queue, priority), not wherever this delivery came from.
        if policy.routing:
            options = routing.retry_options(request, options)
        return self._publish_retry(
            policy.publish_budget, policy, dict(
                args=args, kwargs=kwargs, exc=exc, throw=throw, eta=eta,
                countdown=countdown, max_retries=max_retries, **options,
            ),
        )  # fmt: skip

    def _publish_retry(self, budget: float, policy: RetryPolicy, call: dict[str, Any]) -> Retry:
        """``super().retry(**call)``, retrying a failed publish for ``budget`` seconds."""
        deadline = time.monotonic() + budget
        attempt = 0
        while True:
            try:
                ret: Retry = super().retry(**call)
            except Retry as scheduled:
                self._retry_scheduled(scheduled, call)
                raise
            except Reject as rej:
                # Celery's "publish failed": Reject(<publish error>, requeue=False).
                if rej.requeue or not isinstance(rej.reason, BaseException):
                    raise
                attempt += 1
                delay = backoff(policy.inprocess_backoff, attempt, policy.inprocess_backoff_max)
                if time.monotonic() + delay > deadline:
                    self._hand_back(rej.reason)
                logger.warning(
                    "resilience: %s[%s] retry publish failed (%s); trying again",
                    self.name, self.request.id, rej.reason,
                )  # fmt: skip
                time.sleep(delay)
            else:
                self._retry_scheduled(ret, call)
                return ret

    def _hand_back(self, publish_error: BaseException) -> None:
        """Give the original message back to the broker instead of dropping it."""
        logger.error(
            "resilience: %s[%s] retry could not be published (%s); the original message is "
            "requeued instead of dropped",
            self.name, self.request.id, publish_error,
        )  # fmt: skip
        signals.send(
            signals.retry_publish_failed, self,
            exc=publish_error, task_id=self.request.id, requeued=True,
        )  # fmt: skip
        raise Reject(publish_error, requeue=True) from publish_error

    def _retry_scheduled(self, ret: Retry, call: dict[str, Any]) -> None:
        if ret.is_eager:
            return
        request = self.request
        info = request.delivery_info or {}
        signals.send(
            signals.retry_scheduled, self,
            exc=call.get("exc"), countdown=call.get("countdown"),
            retries=request.retries + 1, queue=call.get("queue") or info.get("routing_key"),
            priority=call.get("priority", info.get("priority")), task_id=request.id,
        )  # fmt: skip

    def _retries_exhausted(self, exc: BaseException) -> None:
        request = self.request
        logger.error(
            "resilience: %s[%s] gave up after %d retries: %s: %s",
            self.name, request.id, request.retries, type(exc).__name__, exc,
        )  # fmt: skip
        signals.send(
            signals.retries_exhausted, self,
            exc=exc, retries=request.retries, task_id=request.id,
            args=request.args, kwargs=request.kwargs,
        )  # fmt: skip
        try:
            self.on_retries_exhausted(exc, request.id, request.args, request.kwargs)
        except Exception:
            logger.exception("resilience: %s.on_retries_exhausted raised; ignored", self.name)


def _resilient_run(task: ResilientTask, run: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(run)
    def resilient_run(*args: Any, **kwargs: Any) -> Any:
        return task._run_tiers(run, args, kwargs)

    return resilient_run
