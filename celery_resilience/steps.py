"""Worker bootsteps. Thin on purpose: each delegates to a framework-free module."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from .config import reset_settings, settings_for

logger = logging.getLogger(__name__)


class SettingsCheck(bootsteps.Step):  # type: ignore[misc]  # celery ships no type stubs
    """Validate the ``resilience_*`` settings while the worker boots.

    A bad value raises :class:`~celery_resilience.ConfigurationError` here, which stops
    the worker before it consumes a single message.
    """

    name = "celery_resilience.SettingsCheck"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        reset_settings(worker.app)  # read app.conf as it is now, after config loading
        settings = settings_for(worker.app)
        logger.debug("resilience: settings %s", settings)
        super().__init__(worker, **kwargs)
