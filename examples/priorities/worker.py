"""The priorities worker: ``celery -A examples.priorities.worker worker -Q high``.

Configured from the environment (the tests and the demo set these):
``PRIORITIES_BROKER_URL`` (required), ``PRIORITIES_PLUGIN`` (``1``: celery-resilience
installed, the default; ``0``: plain Celery), ``PRIORITIES_LAYOUT`` (``one`` or
``three``), ``PRIORITIES_VISIBILITY_TIMEOUT`` (seconds; kombu's default 3600 otherwise).
"""

from __future__ import annotations

import os

from .app import create_app

_timeout = os.environ.get("PRIORITIES_VISIBILITY_TIMEOUT")
app = create_app(
    os.environ["PRIORITIES_BROKER_URL"],
    plugin=os.environ.get("PRIORITIES_PLUGIN", "1") == "1",
    layout=os.environ.get("PRIORITIES_LAYOUT", "one"),
    visibility_timeout=float(_timeout) if _timeout else None,
)
