"""The plugin's kombu transports: kombu's Redis and Sentinel transports, with its channel.

``install(app)`` sets Celery's ``broker_transport`` to one of these, bound to the app
(:func:`bind`), when the broker URL is ``redis://``, ``rediss://`` or ``sentinel://`` and
no transport is configured. kombu then parses the URL as usual and builds this transport:
only that app's broker connections change.

A project with a transport of its own composes the mixins, each before the class it
extends, and names the result in ``broker_transport``; ``install(app)`` binds it::

    class Channel(ChannelMixin, my.Channel): ...


    class Transport(TransportMixin, my.Transport):
        Channel = Channel

``TransportMixin`` changes one thing of kombu's: closing a lost connection closes every
channel. kombu stops at the first channel whose close raises; with Redis down the
remote-control channel's close (deleting its auto-delete queue) raises, and the
consumer's channel after it was never closed, so it never handed back what it had
delivered (Celery <= 5.6 does not close it later). kombu pops each channel before closing
it: calling it again goes on with the rest.
"""

from __future__ import annotations

from typing import Any

import kombu.transport.redis

from .. import internals
from .channel import Channel, SentinelChannel

#: Typed as Any: the mixin goes on kombu's (unannotated) Transport.
_Mixin: Any = object


class TransportMixin(_Mixin):  # type: ignore[misc]
    """kombu transport mixin; ``plugin`` is set on the class :func:`bind` makes."""

    #: The app's plugin (its settings and, in a worker, its ledger); None: unbound.
    plugin: Any = None

    def close_connection(self, connection: Any) -> Any:
        if not internals.available("close"):
            return super().close_connection(connection)
        first: BaseException | None = None
        for _ in range(len(self.channels) + len(getattr(self, "_avail_channels", ())) + 1):
            try:
                super().close_connection(connection)
                break
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first


class Transport(TransportMixin, kombu.transport.redis.Transport):
    """kombu's Redis transport with the plugin's channel."""

    Channel = Channel


class SentinelTransport(TransportMixin, kombu.transport.redis.SentinelTransport):
    """kombu's Sentinel transport with the plugin's channel."""

    Channel = SentinelChannel


class _Named(type):
    """Prints as its URL scheme: kombu writes a transport class into every URI it shows
    (the worker banner, "Connected to redis://..."), where a class's repr would read
    ``<class '...'>://host``."""

    scheme = "redis"

    def __str__(cls) -> str:
        return cls.scheme


def bind(base: type, plugin: Any, scheme: str) -> type:
    """A subclass of transport ``base`` that serves ``plugin`` (one app's)."""
    return _Named(base.__name__, (base,), {"plugin": plugin, "scheme": scheme,
                                           "__module__": base.__module__})  # fmt: skip


def for_scheme(scheme: str) -> type | None:
    """The plugin's transport for a broker URL scheme; None: not a Redis broker."""
    return {"redis": Transport, "rediss": Transport, "sentinel": SentinelTransport}.get(scheme)
