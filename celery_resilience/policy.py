"""The retry policy of a ResilientTask: its options merged over the settings, and the backoff.

Precedence of every option: ``retry(...)`` arguments > task attributes (class attributes
or decorator kwargs) > ``resilience_*`` settings > the documented defaults.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable

from .config import _PARSERS, Settings
from .transient import transient_cause

__all__ = ["RetryPolicy", "backoff"]

_MAX_EXPONENT = 62  # 2**62 s is forever; larger exponents only risk float overflow


def backoff(
    base: float,
    attempt: int,
    cap: float,
    jitter: bool = True,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before ``attempt`` (1-based): ``min(cap, base * 2**(attempt-1))``.

    With ``jitter`` the wait is drawn uniformly from ``[0, that]`` ("full jitter"), which
    spreads the retries of many workers that failed together. Sub-second bases work.
    """
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), _MAX_EXPONENT))
    return rng() * ceiling if jitter else ceiling


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """The effective retry options of one task (attributes merged over settings)."""

    inprocess_budget: float
    inprocess_backoff: float
    inprocess_backoff_max: float
    retry_backoff: float
    retry_backoff_max: float
    retry_jitter: bool
    max_retries: int
    publish_budget: float
    transient_errors: tuple[type[BaseException], ...]
    terminal_errors: tuple[type[BaseException], ...]
    routing: bool = True  # resilience_routing: retries go back to the stamped origin

    @classmethod
    def resolve(cls, task: Any, settings: Settings) -> RetryPolicy:
        """Merge ``task``'s attributes over ``settings``, validating them like settings.

        Scalars: a non-None task attribute wins. Error lists: the task's classes are
        added to the settings' classes.
        """
        values: dict[str, Any] = {"routing": settings.routing}
        for field in dataclasses.fields(cls):
            if field.name == "routing":
                continue
            raw = getattr(task, field.name, None)
            if field.name == "retry_backoff" and raw is True:
                raw = None  # Celery's "backoff on": use the configured base
            configured = getattr(settings, field.name)
            parsed = None if raw is None else _PARSERS[field.name](f"{task.name}.{field.name}", raw)
            if field.name.endswith("_errors"):
                values[field.name] = (parsed or ()) + configured
            else:
                values[field.name] = configured if parsed is None else parsed
        return cls(**values)

    def transient_cause(self, exc: BaseException) -> BaseException | None:
        """The transient exception behind ``exc``, or None when ``exc`` is not retried."""
        return transient_cause(exc, transient=self.transient_errors, terminal=self.terminal_errors)
