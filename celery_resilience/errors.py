"""Exceptions raised by celery-resilience.

The hierarchy::

    CeleryResilienceError            base of everything this package raises
     ├── ConfigurationError          a ``resilience_*`` setting is invalid (ValueError too)
     └── RetriesExhausted            never raised into user code; the *type* used to tag
                                     the ``retries_exhausted`` signal's reason

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

from typing import Any


class CeleryResilienceError(Exception):
    """Base class for every exception celery-resilience raises."""


class ConfigurationError(CeleryResilienceError, ValueError):
    """A ``resilience_*`` setting has a value the plugin cannot use.

    Raised at worker start (and by :func:`celery_resilience.install`), never while tasks
    run. The message names the setting, the bad value and what is allowed.
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid setting {key}={value!r}: {allowed}")


class RetriesExhausted(CeleryResilienceError):
    """Marker for a task that met transient errors until its retry limit ran out."""
