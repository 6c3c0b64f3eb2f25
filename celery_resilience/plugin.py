"""``install(app)``: the one place that registers celery-resilience with a Celery app.

Nothing is registered at import time, and calling ``install`` again changes nothing.
Each app gets its own :class:`Plugin`: its settings, its transport and, in a worker, the
ledger of what the worker holds. Another app in the same process, or kombu used
directly, is left alone, but for keepalive, which is process-wide (redis-py's classes).
"""

from __future__ import annotations

import logging
import ssl
from typing import Any, Callable
from urllib.parse import urlsplit

from kombu.transport import resolve_transport

from . import control, routing
from .config import Settings
from .errors import ConfigurationError
from .redis import fetch, transport
from .sockets import hooks, options
from .worker import steps

logger = logging.getLogger(__name__)

__all__ = ["Plugin", "install", "plugin_of"]


class Plugin:
    """celery-resilience for one app: what its transport and its worker steps read."""

    def __init__(self, app: Any, *, keepalive: bool, routing: bool, fetch: bool) -> None:
        self.app = app
        self.keepalive, self.routing, self.fetch = keepalive, routing, fetch
        self._settings: Settings | None = None
        self._bad_settings_said = False
        #: What the worker holds (worker/ledger.py); set by its Delivery step, None elsewhere.
        self.ledger: Any = None

    def __repr__(self) -> str:
        return f"<celery_resilience.Plugin of {self.app.main!r}>"

    # -- settings -------------------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The app's validated settings (read once; :meth:`reset` reads them again)."""
        if self._settings is None:
            self._settings = Settings.from_conf(self.app.conf)
        return self._settings

    def reset(self) -> None:
        self._settings = None

    def _lenient(self, read: Callable[[Settings], Any]) -> Any:
        # Read on a publish or a connect: a bad setting must not break it. The worker
        # refuses to start with it (SettingsCheck); anywhere else the part is off.
        try:
            return read(self.settings)
        except ConfigurationError as exc:
            if not self._bad_settings_said:
                self._bad_settings_said = True
                logger.error("resilience: %s; the plugin's parts that read it are off", exc)
            return None

    def routing_options(self) -> routing.RoutingOptions | None:
        return self._lenient(routing.options_from) if self.routing else None

    def fetch_options(self) -> fetch.FetchOptions | None:
        return self._lenient(fetch.options_from) if self.fetch else None

    def keepalive_options(self) -> options.KeepaliveOptions | None:
        return self._lenient(options.options_from) if self.keepalive else None

    # -- the transport --------------------------------------------------------------------------

    def serves(self, conf: Any) -> bool:
        """Whether the app's broker connections use this plugin's transport."""
        return getattr(conf.broker_transport, "plugin", None) is self

    def select_transport(self, conf: Any) -> None:
        """Point ``broker_transport`` at the plugin's transport, bound to this app."""
        scheme = _scheme(conf.broker_url)
        configured = conf.broker_transport
        if self.serves(conf):
            if transport.for_scheme(scheme) is None:  # the URL changed after configuring
                conf.broker_transport = None
                self._step_aside(scheme)
            return
        if configured is None:
            base = transport.for_scheme(scheme)
            if base is None:
                self._step_aside(scheme)
                return
            if scheme == "rediss" and not conf.broker_use_ssl:
                # kombu's own default for rediss:// (it only applies it to its own
                # transport name): TLS without certificate checks, with its warning.
                logger.warning("Secure redis scheme specified (rediss) with no ssl options, "
                               "defaulting to insecure SSL behaviour.")  # fmt: skip
                conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_NONE}
            conf.broker_transport = transport.bind(base, self, scheme)
            return
        cls = resolve_transport(configured) if isinstance(configured, str) else configured
        if isinstance(cls, type) and issubclass(cls, transport.TransportMixin):
            conf.broker_transport = transport.bind(cls, self, scheme)
            return
        logger.warning("resilience: broker_transport is %r: the atomic fetch, the origin stamp "
                       "and the restore fixes are off. Compose "
                       "celery_resilience.redis.TransportMixin and ChannelMixin into it to keep "
                       "them.", configured)  # fmt: skip

    def _step_aside(self, scheme: str) -> None:
        logger.warning("resilience: the broker (%s://) is not Redis: the atomic fetch, the "
                       "origin stamp and the restore fixes are off; keepalive and retries "
                       "work", scheme or "amqp")  # fmt: skip

    def on_configured(self, source: Any = None, **_: Any) -> None:
        self.select_transport(self.app.conf)


def _scheme(url: Any) -> str:
    first = url.split(";")[0] if isinstance(url, str) else ""
    return urlsplit(first).scheme.lower() if "://" in first else ""


def plugin_of(app: Any) -> Plugin | None:
    """The plugin ``install`` gave ``app``; None if it has none."""
    for step in app.steps["worker"]:
        plugin = getattr(step, "plugin", None)
        if isinstance(plugin, Plugin):
            return plugin
    return None


def install(app: Any, *, keepalive: bool = True, routing: bool = True, fetch: bool = True) -> Any:
    """Register celery-resilience with ``app`` and return ``app``.

    - A worker bootstep validates every ``resilience_*`` setting when the worker starts
      (a bad value stops it with :class:`~celery_resilience.ConfigurationError`).
    - On a ``redis://``, ``rediss://`` or ``sentinel://`` broker with no
      ``broker_transport`` set, the app's broker connections use the plugin's transport
      (:mod:`celery_resilience.redis`): the origin stamp on every task message
      (``routing=True``), restores that keep queue and priority, the atomic fetch and the
      reclaimer in a worker (``fetch=True``), and the fixes for lost connections.
    - ``keepalive=True``: TCP keepalive on every Redis connection this process opens
      from now on (web processes too), and in a worker on the ones already open and in
      its pool children; ``celery inspect resilience_sockets`` audits it.
    - Always: a worker taking in a large ETA backlog (or whose full garbage collections
      get slow) freezes what is alive out of the collector's walks, so urgent tasks do
      not wait out 100-300 ms collections (``resilience_gc_freeze``).

    Tasks get the retry behaviour from :class:`~celery_resilience.ResilientTask`
    (``task_cls=ResilientTask`` or ``base=ResilientTask``).
    """
    if plugin_of(app) is not None:
        return app
    plugin = Plugin(app, keepalive=keepalive, routing=routing, fetch=fetch)
    for blueprint, classes in (("worker", steps.WORKER_STEPS), ("consumer", steps.CONSUMER_STEPS)):
        app.steps[blueprint].update(_bound(classes, plugin))
    if keepalive:
        control.register()
        # This process (a web process publishing tasks, too). Settings are read at the
        # first connect, so install() may run before the configuration is loaded.
        hooks.enable(plugin.keepalive_options)
    if app.configured:
        plugin.select_transport(app.conf)
    else:
        app.on_after_configure.connect(plugin.on_configured, weak=False)
    return app


def _bound(classes: tuple[type, ...], plugin: Plugin) -> list[type]:
    """Subclasses of the step ``classes`` with ``plugin`` set, requiring each other."""
    bound: dict[type, type] = {}
    for step in classes:  # each after the steps it requires
        attrs = {
            "plugin": plugin,
            "name": getattr(step, "name"),  # noqa: B009  # StepType would derive a new name
            "requires": tuple(bound.get(r, r) for r in getattr(step, "requires")),  # noqa: B009
            "__module__": step.__module__,
        }
        bound[step] = type(step)(step.__name__, (step,), attrs)
    return list(bound.values())
