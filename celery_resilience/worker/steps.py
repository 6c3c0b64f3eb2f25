"""Worker bootsteps, thin on purpose: each hands its work to a framework-free object.

``install(app)`` adds a subclass of each to the app's blueprints with ``plugin`` set (the
app's :class:`~celery_resilience.plugin.Plugin`): the steps reach their settings and the
ledger through it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.concurrency import prefork
from celery.signals import task_received, worker_process_init, worker_shutdown

from .. import internals, signals
from ..sockets import audit, hooks
from ..sockets.options import KeepaliveOptions
from . import heap, pool
from .ledger import Ledger
from .reclaimer import Reclaimer

logger = logging.getLogger(__name__)


class SettingsCheck(bootsteps.Step):  # type: ignore[misc]  # celery ships no type stubs
    """Validate the ``resilience_*`` settings while the worker boots, and pick the transport.

    A bad value raises :class:`~celery_resilience.ConfigurationError` here, which stops
    the worker before it consumes a single message.
    """

    name = "celery_resilience.SettingsCheck"
    plugin: Any = None

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.plugin.reset()  # read app.conf as it is now, after config loading
        logger.debug("resilience: settings %s", self.plugin.settings)
        self.plugin.select_transport(worker.app.conf)  # the CLI may have changed the URL
        super().__init__(worker, **kwargs)


class Keepalive(bootsteps.Step):  # type: ignore[misc]
    """Force TCP keepalive on every Redis socket of this worker and its pool children.

    Runs while the worker is built, before the pool forks: hooks redis-py's connect and
    sweeps the connections opened at import time. Each prefork child sweeps again when it
    starts.
    """

    name = "celery_resilience.Keepalive"
    requires = (SettingsCheck,)
    plugin: Any = None

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        plugin = self.plugin
        options = plugin.keepalive_options()
        if options is not None:
            hooks.enable(plugin.keepalive_options, heal=plugin.settings.keepalive_heal)
            audit.sweep(options)
            worker_process_init.connect(self._sweep_child, weak=False, dispatch_uid=self.name)
        super().__init__(worker, **kwargs)

    def _sweep_child(self, **_: Any) -> None:
        """In a fresh pool child: options on whatever it holds before its first task."""
        options = self.plugin.keepalive_options()
        if options is not None:
            audit.sweep(options)


class Delivery(bootsteps.StartStopStep):  # type: ignore[misc]
    """What the worker holds: the ledger, the prefork pool that keeps its jobs, and the
    reclaimer thread (see :mod:`.reclaimer`).

    The reclaimer starts with the worker and stops at ``worker_shutdown``: on a warm
    shutdown Celery stops the steps (this one before the pool has finished its tasks) and
    only then closes the consumer's channel, which hands back what it still holds. The
    last pass must come after both.
    """

    name = "celery_resilience.Delivery"
    requires = (SettingsCheck,)
    plugin: Any = None

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.reclaimer: Reclaimer | None = None
        self.ledger: Ledger | None = None
        if self.plugin.serves(worker.app.conf):
            self.ledger = self.plugin.ledger = Ledger(worker.hostname)
            # Steps are all built before any creates its part: the Pool step sees this.
            if worker.pool_cls is prefork.TaskPool and internals.available("pool"):
                worker.pool_cls = pool.TaskPool
        super().__init__(worker, **kwargs)

    def create(self, worker: Any) -> None:
        options = self.plugin.fetch_options()
        if self.ledger is None or options is None:
            return
        self.reclaimer = Reclaimer(worker.app, options, self.ledger)
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

    See :mod:`.heap`. A consumer step: Celery restarts the consumer after a lost
    connection, and its ``on_close`` clears the timer (every ETA task it held, and any
    entry of ours); the freeze ends with it and starts again with the new consumer.
    ``task_received`` (sent by the consumer, in this process) counts the ETA tasks taken
    in; the check (report, unfreeze) runs on the consumer's timer.
    """

    name = "celery_resilience.HeapFreeze"
    CHECK_EVERY = 5.0  # seconds
    plugin: Any = None

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        settings = self.plugin.settings
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


class KeepaliveReport(bootsteps.StartStopStep):  # type: ignore[misc]
    """Once the broker connection is up: one INFO line and ``keepalive_applied``."""

    name = "celery_resilience.KeepaliveReport"
    requires = ("celery.worker.consumer.tasks:Tasks",)
    plugin: Any = None

    def start(self, consumer: Any) -> None:
        options = self.plugin.keepalive_options()
        if options is None:
            logger.info("resilience: keepalive off (resilience_keepalive=False)")
            return
        audit.sweep(options)
        entries = audit.audit()
        covered = sum(1 for entry in entries if _matches(entry, options))
        logger.info("resilience: keepalive idle=%ss interval=%ss count=%s user_timeout=%ss "
                    "on %d/%d redis sockets", options.idle, options.interval, options.count,
                    options.user_timeout, covered, len(entries))  # fmt: skip
        signals.send(signals.keepalive_applied, self, sockets=covered, total=len(entries))


def _matches(entry: dict[str, Any], options: KeepaliveOptions) -> bool:
    return bool(
        entry.get("keepalive") == 1
        and entry.get("idle") == options.idle
        and entry.get("interval") == options.interval
        and entry.get("count") == options.count
    )


WORKER_STEPS = (SettingsCheck, Keepalive, Delivery)
CONSUMER_STEPS = (HeapFreeze, KeepaliveReport)
