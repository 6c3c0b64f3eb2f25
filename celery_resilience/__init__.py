"""celery-resilience: keep Celery + Redis work alive through network and Redis blips.

Two lines::

    app = Celery("proj", broker=..., backend=..., task_cls=ResilientTask)
    install(app)
"""

from __future__ import annotations

from . import signals
from .config import Settings
from .errors import CeleryResilienceError, ConfigurationError
from .plugin import install
from .retry import ResilientTask, RetryPolicy, backoff
from .transient import is_transient, transient_cause

__version__ = "0.1.0"

__all__ = [
    "CeleryResilienceError",
    "ConfigurationError",
    "ResilientTask",
    "RetryPolicy",
    "Settings",
    "__version__",
    "backoff",
    "install",
    "is_transient",
    "signals",
    "transient_cause",
]
