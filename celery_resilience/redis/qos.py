"""The QoS of the plugin's Redis channel: acks, rejects and restores that lose nothing.

kombu's Redis ``QoS`` keeps what a channel delivered and not yet acked. :class:`QoSMixin`
changes four things, each an override that calls kombu where it wraps:

- ``append``: the atomic fetch has already written the ``unacked`` record; only the
  in-memory bookkeeping is left to do.
- ``_remove_from_indices`` (ack, reject, restore all end there): the message leaves this
  worker's in-flight hash in the same pipeline, and the worker's ledger.
- ``restore_by_tag`` (and with it ``reject(requeue=True)`` and the visibility sweep): one
  transaction as kombu's, to the list the origin stamp names, with a log line and the
  ``message_restored`` signal per message, naming the reason (:mod:`.restore`).
- ``restore_unacked`` (a consuming channel closes): kombu hands back every message the
  channel delivered, tasks still running in the pool included (a duplicate as soon as
  Redis answers), and, when Redis is down, gives up on all of them, leaving them in
  ``unacked`` for the visibility timeout (an hour by default). Here only the messages
  nobody runs go back; the rest (and all of them while Redis is unreachable) stay in
  the worker's ledger until their ack removes them or the reclaimer restores them.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import kombu.transport.redis
from kombu.transport.virtual.base import QoS as VirtualQoS

from . import keys, restore

logger = logging.getLogger(__name__)

#: kombu's virtual QoS.append: the in-memory half of the Redis QoS's.
_in_memory_append: Any = VirtualQoS.append

#: Typed as Any: the mixin goes on kombu's (unannotated) QoS.
_Mixin: Any = object


class QoSMixin(_Mixin):  # type: ignore[misc]
    """kombu Redis QoS mixin (see the module doc); ``self.channel`` is a ChannelMixin."""

    _reason = restore.CONNECTION_LOST  # of a restore kombu starts (reject, the sweep)

    def append(self, message: Any, delivery_tag: Any) -> Any:
        state = self.channel._fetch
        if state is not None and state.recorded == delivery_tag:
            state.recorded = None
            return _in_memory_append(self, message, delivery_tag)
        return super().append(message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        pipe = super()._remove_from_indices(delivery_tag, pipe)
        ledger = self.channel.ledger()
        if ledger is None:
            return pipe
        tag = restore.text(delivery_tag)
        ledger.forget(tag)
        return pipe.hdel(keys.inflight(ledger.owner), tag)

    def restore_by_tag(
        self,
        tag: Any,
        client: Any = None,
        leftmost: bool = False,
        *,
        reason: str | None = None,
        message: Any = None,
        lost: bool = False,
    ) -> restore.Restored | None:
        """kombu's ``restore_by_tag``, with a reason, and the in-memory copy when ``lost``."""
        with self.channel.conn_or_acquire(client) as client:
            return restore.restore(self, restore.text(tag), client, reason=reason or self._reason,
                                   leftmost=leftmost, message=message, lost=lost)  # fmt: skip

    def reject(self, delivery_tag: Any, requeue: bool = False) -> Any:
        with self._restoring(restore.REJECTED):
            return super().reject(delivery_tag, requeue)

    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        with self._restoring(restore.VISIBILITY_TIMEOUT):
            return super().restore_visible(*args, **kwargs)

    @contextlib.contextmanager
    def _restoring(self, reason: str) -> Iterator[None]:
        self._reason = reason
        try:
            yield
        finally:
            self._reason = QoSMixin._reason

    def restore_unacked(self, client: Any = None) -> Any:
        channel = self.channel
        ledger = channel.ledger()
        if ledger is None or not channel.fetch_state():
            with self._restoring(_closing_reason(ledger)):
                return super().restore_unacked(client)
        channel.restoring = True
        try:
            self._restore_delivered(ledger, client)
        finally:
            channel.settled = channel.closed
            channel.restoring = False
        return None

    def _restore_delivered(self, ledger: Any, client: Any) -> None:
        delivered = list(self._delivered.items())
        self._delivered.clear()
        busy = {} if ledger.terminating() else ledger.running()
        run_id = self.channel.fetch_state().run_id
        todo = []
        for tag, message in delivered:
            request = busy.get(str(tag))
            if request is not None:  # its ack (or the reclaimer) settles it
                ledger.keep(str(tag), message, run_id, weakref.ref(request))
            else:
                todo.append((str(tag), message))
        done = 0
        try:
            with self.channel.conn_or_acquire(client) as client:
                lost = ledger.data_lost(run_id, client)
                for tag, message in todo:
                    self.restore_by_tag(tag, client, reason=_closing_reason(ledger),
                                        message=message, lost=lost)  # fmt: skip
                    done += 1
        except Exception as exc:  # never lose them, whatever failed: the reclaimer retries
            for tag, message in todo[done:]:
                ledger.keep(tag, message, run_id)
            expected = (*ledger.connection_errors, *self.channel.connection_errors)
            logger.warning("resilience: %d message(s) could not be restored now (%s); they are "
                           "restored once Redis answers", len(todo) - done, exc,
                           exc_info=not isinstance(exc, expected))  # fmt: skip
        if len(todo) < len(delivered):
            logger.info("resilience: %d running task(s) keep their message until they finish",
                        len(delivered) - len(todo))  # fmt: skip


def _closing_reason(ledger: Any) -> str:
    stopping = ledger is not None and ledger.stopping()
    return restore.SHUTDOWN if stopping else restore.CONNECTION_LOST


class QoS(QoSMixin, kombu.transport.redis.QoS):
    """kombu's Redis QoS with the plugin's acks and restores."""
