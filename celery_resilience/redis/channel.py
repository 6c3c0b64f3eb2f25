"""The plugin's kombu Redis channel: what it changes in kombu's, one override each.

- **The fetch** (:class:`~.fetch.FetchMixin`): an atomic fetch in place of BRPOP.
- **The origin stamp** (``_put``): every task message going onto a list is stamped with
  that list's queue, its exchange, routing key and priority (:mod:`celery_resilience.routing`),
  unless it already carries a stamp (a retry keeps its first one).
- **Restores** (``_do_restore_message``): to the list the stamp names (:mod:`.restore`).
- **The kept connection info** (``_connparams``): ``Connection.collect()`` clears the
  transport's client, and closing the channel its transport; every pool kombu builds
  after that (to restore at close, to ack a task that outlived its connection) failed
  with ``AttributeError: 'NoneType' object has no attribute 'hostname'``. On Celery 5.7
  that killed the worker on a Redis restart ("Unrecoverable error"). The channel keeps
  the connection info it was created with.
- **The event loop** (``_on_connection_disconnect``, kombu < 5.7): a connection of a
  channel that never opened or has closed, freed by the garbage collector, stopped the
  live consumer's polling for good (celery/celery#8030; fixed in kombu 5.7 by #2007,
  #2492 and #2630, backported here).

The channel learns its plugin from its transport class (:mod:`.transport`); without one
(kombu used directly with these classes) it behaves as kombu's, kept connection info and
event-loop backport aside.
"""

from __future__ import annotations

import logging
import uuid
from types import SimpleNamespace
from typing import Any

import kombu.transport.redis

from .. import internals, routing
from . import restore
from .fetch import FetchMixin
from .qos import QoS

logger = logging.getLogger(__name__)

#: kombu 5.7 stops polling only for a channel the poller serves (kombu#2492, #2630).
_KOMBU_DISCONNECT_FIXED = internals.KOMBU >= (5, 7)


class ChannelMixin(FetchMixin):
    """kombu Redis channel mixin; put it before kombu's Channel (or a subclass of it)."""

    QoS = QoS
    _conninfo: tuple[Any, Any] | None = None  # (kombu Connection, default port)
    restoring = False  # a close-time restore is under way (the reclaimer leaves it alone)
    settled = False  # closed, and what it delivered is restored or in the ledger
    _in_listen: Any  # kombu's

    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        self._plugin = getattr(connection, "plugin", None)
        self._chan_id = uuid.uuid4().hex[:12]
        super().__init__(connection, *args, **kwargs)

    # -- what the plugin says ---------------------------------------------------------------

    def ledger(self) -> Any:
        """The worker's ledger, or None (a publisher, or kombu used directly)."""
        return getattr(self._plugin, "ledger", None)

    def restore_quarantine(self) -> str | None:
        """Where a restore nobody can route goes; None: routing is off (kombu's routes)."""
        options = self._plugin.routing_options() if self._plugin is not None else None
        return options.quarantine_queue if options is not None else None

    def holds_deliveries(self) -> bool:
        """Whether this channel still answers for what it delivered (the reclaimer's test)."""
        if self.restoring:  # 10 000 messages take seconds: not lost replies meanwhile
            return True
        if self.settled:
            return False
        qos = self.__dict__.get("_qos")
        return not self.closed or bool(qos is not None and qos._delivered)

    # -- the stamp ------------------------------------------------------------------------------

    def _put(self, queue: str, message: Any, **kwargs: Any) -> Any:
        if self.restore_quarantine() is not None and internals.available("stamp"):
            message = routing.stamped(message, queue)
        return super()._put(queue, message, **kwargs)

    # -- restores -------------------------------------------------------------------------------

    def _do_restore_message(
        self, payload: Any, exchange: Any, routing_key: Any, pipe: Any, leftmost: bool = False
    ) -> Any:
        if not internals.available("restore"):
            return super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        try:
            restore.push(pipe, payload, restore.choose(self, payload, exchange, routing_key),
                         leftmost)  # fmt: skip
        except self.connection_errors:
            raise  # aborts the transaction: the message stays in unacked
        except Exception:
            logger.critical("Could not restore message: %r", payload, exc_info=True)

    # -- the kept connection info ---------------------------------------------------------------

    def _connparams(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if not internals.available("conninfo"):
            return super()._connparams(asynchronous)
        if transport is not None and transport.client is not None:
            self._conninfo = (transport.client, transport.default_port)
            return super()._connparams(asynchronous)
        if self._conninfo is None:
            return super()._connparams(asynchronous)
        client, port = self._conninfo
        rebound = _Rebound(self, SimpleNamespace(client=client, default_port=port))
        return super()._connparams.__func__(rebound, asynchronous)

    # -- the event loop (kombu < 5.7) -----------------------------------------------------------

    def _on_connection_disconnect(self, connection: Any) -> None:
        cycle = getattr(self.connection, "cycle", None)
        if (
            _KOMBU_DISCONNECT_FIXED
            or cycle is None
            or self in cycle._channels
            or not internals.available("event loop")
        ):
            super()._on_connection_disconnect(connection)
            return
        # A channel the poller no longer serves: clear its own state, as kombu does, and
        # make the poller forget its sockets (it would hand the loop closed ones: EBADF),
        # but leave the live consumer's polling alone.
        if self._in_poll is connection:
            self._in_poll = None
        if self._in_listen is connection:
            self._in_listen = None
        for key in [key for key in cycle._chan_to_sock if key[0] is self]:
            del cycle._chan_to_sock[key]
        for fd in [fd for fd, (chan, _) in cycle._fd_to_chan.items() if chan is self]:
            del cycle._fd_to_chan[fd]


class _Rebound:
    """The channel as kombu's ``_connparams`` reads it, with its transport's info back."""

    def __init__(self, channel: Any, connection: Any) -> None:
        self._channel = channel
        self.connection = connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


class Channel(ChannelMixin, kombu.transport.redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel with the plugin's fetch, stamp, restores and fixes."""


class SentinelChannel(ChannelMixin, kombu.transport.redis.SentinelChannel):  # type: ignore[misc]
    """kombu's Sentinel channel with the plugin's fetch, stamp, restores and fixes."""
