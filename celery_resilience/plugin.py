"""``install(app)``: the one place that registers celery-resilience with a Celery app.

Nothing is registered at import time. Calling ``install`` again changes nothing.
"""

from __future__ import annotations

from typing import Any

from .steps import SettingsCheck

__all__ = ["install"]


def install(app: Any) -> Any:
    """Register celery-resilience with ``app`` and return ``app``.

    Adds a worker bootstep that validates every ``resilience_*`` setting when the worker
    starts (a bad value stops it with :class:`~celery_resilience.ConfigurationError`).
    Tasks get the retry behaviour from :class:`~celery_resilience.ResilientTask`
    (``task_cls=ResilientTask`` or ``base=ResilientTask``).
    """
    app.steps["worker"].add(SettingsCheck)  # a set: adding twice is a no-op
    return app
