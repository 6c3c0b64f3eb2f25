"""celery-resilience: keep Celery + Redis work alive through network and Redis blips."""

from __future__ import annotations

__version__ = "0.1.0"
