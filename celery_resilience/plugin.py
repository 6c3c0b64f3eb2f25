"""``install(app)``: the one place that registers celery-resilience with a Celery app.

Nothing is registered at import time. Calling ``install`` again changes nothing.
"""

from __future__ import annotations

from typing import Any

from . import control
from .config import settings_for
from .keepalive import enable as enable_keepalive
from .keepalive import options_from
from .routing import install_routing
from .steps import HeapFreeze, Keepalive, KeepaliveReport, ReliableFetch, SettingsCheck

__all__ = ["install"]


def install(app: Any, *, keepalive: bool = True, routing: bool = True, fetch: bool = True) -> Any:
    """Register celery-resilience with ``app`` and return ``app``.

    - A worker bootstep validates every ``resilience_*`` setting when the worker starts
      (a bad value stops it with :class:`~celery_resilience.ConfigurationError`).
    - ``keepalive=True``: TCP keepalive on every Redis connection this process opens
      from now on (web processes too), and in a worker on the ones already open and in
      its pool children; ``celery inspect resilience_sockets`` audits it.
    - ``routing=True``: every task message published from this process is stamped with
      its origin (queue, exchange/routing key, priority); ResilientTask retries and
      messages kombu's Redis transport restores go back there, and a restored message
      kombu would drop goes to ``resilience_quarantine_queue`` (``resilience_routing``
      turns it off without a code change).
    - ``fetch=True``: a worker on a Redis broker takes each message atomically into its
      unacked record, and a reclaimer thread puts back what a lost connection or a dead
      worker left behind, keeps held messages' leases, and survives Redis restarts
      (``resilience_fetch`` turns it off without a code change).
    - Always: a worker taking in a large ETA backlog (or whose full garbage collections
      get slow) freezes what is alive out of the collector's walks, so urgent tasks do
      not wait out 100-300 ms collections (``resilience_gc_freeze``).

    Tasks get the retry behaviour from :class:`~celery_resilience.ResilientTask`
    (``task_cls=ResilientTask`` or ``base=ResilientTask``).
    """
    app.steps["worker"].add(SettingsCheck)  # sets: adding twice is a no-op
    if keepalive:
        app.steps["worker"].add(Keepalive)
        app.steps["consumer"].add(KeepaliveReport)
        control.register()
        # This process (a web process publishing tasks, too): settings are read lazily at
        # the first connect, so install() may run before the configuration is loaded.
        # Healing is on here; a worker's bootstep applies resilience_keepalive_heal.
        enable_keepalive(lambda: options_from(settings_for(app)))
    app.steps["consumer"].add(HeapFreeze)
    if fetch:
        app.steps["worker"].add(ReliableFetch)
    if routing:
        # Process-wide and lazy like keepalive: the publish receiver and kombu's restore
        # read the settings at first use.
        install_routing(app)
    return app
