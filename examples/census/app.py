"""The census worker: ``celery -A examples.census.app worker``."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from urllib.parse import urlsplit

import django
import redis
import redis.asyncio
from celery import Celery

from celery_resilience import ResilientTask, install

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.census.settings")
django.setup()

from django.conf import settings  # noqa: E402
from django.core.cache import cache  # noqa: E402

_url = urlsplit(settings.REDIS_URL)
# Opened while the module is imported, before install() and any worker bootstep: only
# the worker's sweep can reach it.
AT_IMPORT = redis.Redis.from_url(f"{settings.REDIS_URL}/3")
AT_IMPORT.ping()

app = Celery("census", task_cls=ResilientTask)
app.config_from_object("django.conf:settings", namespace="CELERY")
if os.environ.get("CENSUS_PLUGIN", "1") == "1":
    install(app)
# The application's own client, connected on first use (in the pool children).
CLIENT = redis.Redis(host=_url.hostname or "127.0.0.1", port=_url.port or 6379, db=3)
# An asyncio client on an event loop each thread keeps, so its socket stays open.
_local = threading.local()


def _async_incr(key: str) -> None:
    if not hasattr(_local, "loop"):
        _local.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_local.loop)  # Python 3.9: the client binds the current loop
        _local.client = redis.asyncio.Redis(
            host=_url.hostname or "127.0.0.1", port=_url.port or 6379, db=3
        )
    _local.loop.run_until_complete(_local.client.incr(key))


@app.task(name="census.touch")
def touch(hold: float = 0.0) -> int:
    """Use every kind of connection once; hold the pool slot for ``hold`` seconds."""
    cache.set("census", os.getpid())
    CLIENT.incr("census:app")
    AT_IMPORT.incr("census:import")
    _async_incr("census:async")
    time.sleep(hold)
    return os.getpid()
