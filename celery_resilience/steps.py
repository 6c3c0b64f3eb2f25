"""Worker bootsteps. Thin on purpose: each delegates to a framework-free module."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.signals import task_received, worker_process_init, worker_shutdown

from . import fetch, heap, inflight, keepalive, signals
from .config import reset_settings, settings_for
from .reclaim import Reclaimer

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


class Keepalive(bootsteps.Step):  # type: ignore[misc]
    """Force TCP keepalive on every Redis socket of this worker and its pool children.

    Runs while the worker is built, before the pool forks: patches redis-py's connect and
    sweeps the connections opened at import time. Each prefork child sweeps again when it
    starts. Works on its own too: ``app.steps["worker"].add(Keepalive)``.
    """

    name = "celery_resilience.Keepalive"
    requires = (SettingsCheck,)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        app = worker.app
        options = keepalive.options_from(settings_for(app))
        if options is not None:
            keepalive.enable(
                lambda: keepalive.options_from(settings_for(app)),
                heal=settings_for(app).keepalive_heal,
            )
            keepalive.sweep(options)
            worker_process_init.connect(_sweep_child, weak=False, dispatch_uid=self.name)
        super().__init__(worker, **kwargs)


def _sweep_child(**_: Any) -> None:
    """In a fresh pool child: options on whatever the child holds before its first task."""
    options = keepalive.options_from(_current_settings())
    if options is not None:
        keepalive.sweep(options)


def _current_settings() -> Any:
    from celery import current_app

    return settings_for(current_app)


class ReliableFetch(bootsteps.StartStopStep):  # type: ignore[misc]
    """Atomic fetch and the reclaimer thread (see :mod:`~celery_resilience.reclaim`).

    The reclaimer starts with the worker and stops at ``worker_shutdown``: on a warm
    shutdown Celery stops the steps (this one before the pool has finished its tasks) and
    only then closes the consumer's channel, which hands back what it still holds. The
    last pass must come after both.
    """

    name = "celery_resilience.ReliableFetch"
    requires = (SettingsCheck,)

    def create(self, worker: Any) -> None:
        app = worker.app
        self.reclaimer: Reclaimer | None = None
        inflight.enable(worker.hostname)  # the connparams fix applies with fetch off too
        options = fetch.options_from(settings_for(app))
        if options is None or not _redis_broker(app):
            return
        fetch.enable(lambda: fetch.options_from(settings_for(app)))
        self.reclaimer = Reclaimer(app, options)
        worker_shutdown.connect(self.last_pass, sender=worker, weak=False)

    def start(self, worker: Any) -> None:
        if self.reclaimer is not None:
            self.reclaimer.start()

    def stop(self, worker: Any) -> None:
        """Nothing yet: the pool and the consumer's channel are still at work."""

    def terminate(self, worker: Any) -> None:
        # A cold shutdown sends no worker_shutdown. Its pool is gone and the closing
        # channel hands back everything it holds, so nothing is left for a later pass.
        self.last_pass(sender=worker)

    def last_pass(self, sender: Any = None, **_: Any) -> None:
        worker_shutdown.disconnect(self.last_pass, sender=sender)
        if self.reclaimer is not None:
            self.reclaimer.stop()


class HeapFreeze(bootsteps.StartStopStep):  # type: ignore[misc]
    """Keep the garbage collector from walking the ETA tasks the consumer holds.

    See :mod:`~celery_resilience.heap`. A consumer step: Celery restarts the consumer
    after a lost connection, and its ``on_close`` clears the timer (every ETA task it
    held, and any entry of ours); the freeze ends with it and starts again with the new
    consumer. ``task_received`` (sent by the consumer, in this process) counts the ETA
    tasks taken in; the check (report, unfreeze) runs on the consumer's timer.
    """

    name = "celery_resilience.HeapFreeze"
    CHECK_EVERY = 5.0  # seconds

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        settings = settings_for(consumer.app)
        self.freezer: heap.Freezer | None = None
        if settings.gc_freeze:
            self.freezer = heap.Freezer(settings.gc_freeze_after, settings.gc_freeze_every)
        self.tref: Any = None
        super().__init__(consumer, **kwargs)

    def start(self, consumer: Any) -> None:
        if self.freezer is None:
            return
        self.freezer.install()
        task_received.connect(self._received, weak=False, dispatch_uid=self.name)
        # The ETA tasks are the timer's entries (plus a few periodic ones of Celery's).
        timer, check = consumer.timer, self.freezer.check
        self.tref = timer.call_repeatedly(self.CHECK_EVERY, lambda: check(len(timer)))

    def _received(self, request: Any = None, **_: Any) -> None:
        if self.freezer is not None:
            self.freezer.received(request)

    def stop(self, consumer: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if self.freezer is not None:
            task_received.disconnect(self._received, dispatch_uid=self.name)
            self.freezer.remove()

    shutdown = stop


def _redis_broker(app: Any) -> bool:
    transport = app.connection_for_write().transport_cls
    return str(transport).split("+")[0] in ("redis", "rediss", "sentinel")


class KeepaliveReport(bootsteps.StartStopStep):  # type: ignore[misc]
    """Once the broker connection is up: one INFO line and ``keepalive_applied``."""

    name = "celery_resilience.KeepaliveReport"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, consumer: Any) -> None:
        options = keepalive.options_from(settings_for(consumer.app))
        if options is None:
            logger.info("resilience: keepalive off (resilience_keepalive=False)")
            return
        keepalive.sweep(options)
        entries = keepalive.audit()
        covered = sum(1 for entry in entries if _matches(entry, options))
        logger.info(
            "resilience: keepalive idle=%ss interval=%ss count=%s user_timeout=%ss "
            "on %d/%d redis sockets",
            options.idle, options.interval, options.count, options.user_timeout,
            covered, len(entries),
        )  # fmt: skip
        signals.send(signals.keepalive_applied, self, sockets=covered, total=len(entries))


def _matches(entry: dict[str, Any], options: keepalive.KeepaliveOptions) -> bool:
    return bool(
        entry.get("keepalive") == 1
        and entry.get("idle") == options.idle
        and entry.get("interval") == options.interval
        and entry.get("count") == options.count
    )
