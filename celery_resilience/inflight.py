"""In-flight messages: what this worker holds, so that a broken connection loses nothing.

Every message the atomic fetch (:mod:`~celery_resilience.fetch`) takes is recorded, in
the same step, in kombu's ``unacked`` hash and in this worker's in-flight hash
``resilience.inflight.<owner>`` (delivery tag -> id of the channel that fetched it).
This module keeps the process's side of that bookkeeping and patches the places
where kombu's Redis transport (and Celery's prefork pool) mishandle a lost connection:

- ``Channel._connparams``: after ``Connection.collect()`` has cleared the transport's
  client (and closing the channel its transport), kombu builds a new pool from ``None``
  and raises ``AttributeError: 'NoneType' object has no attribute 'hostname'`` — in
  ``Channel.close`` (restoring the unacked messages; the "Unrecoverable error" that
  kills a Celery 5.7 worker on a Redis restart) and in every late ack of a task that
  outlived its connection. The patch keeps the channel's connection info, so closing
  and acking work on a fresh connection.
- ``QoS.restore_unacked`` (runs when a consuming channel closes): kombu restores every
  message the channel delivered, including tasks still running in the pool (a duplicate
  as soon as Redis answers) and, when Redis is down, gives up on all of them, leaving them
  in ``unacked`` for the visibility timeout (an hour by default). The guard restores the
  messages nobody runs now; what it cannot restore, and what is still running, waits in
  the *limbo* of this process for the reclaimer (:mod:`~celery_resilience.reclaim`).
- ``QoS._remove_from_indices`` (ack, reject, restore): also forgets the message in the
  in-flight hash and in the limbo.
- ``Transport.close_connection``: kombu stops closing the transport's channels at the
  first one that raises (the remote-control channel, with Redis down), so the consumer's
  channel is never closed and never hands back what it delivered (Celery <= 5.6).
- ``Channel._on_connection_disconnect`` (kombu < 5.7): a connection of a channel that
  never opened or has closed, freed by the collector, stops the live consumer's polling
  (the worker never fetches again); only a channel the poller serves reports now, and
  the poller forgets the sockets of one it no longer serves.
- Celery's ``AsynPool.flush``: it forgets the tasks the pool runs (<= 5.6) or was sent
  (5.7) when the connection is lost, so they are never acked; the patch keeps them.

When Redis has lost its data (restarted without persistence, or from an older dump: its
``run_id`` changed), a message this process still holds in memory and that Redis no
longer records is pushed back from the in-memory copy. :func:`disable` undoes the patches.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any, Callable, cast

from ._patch import Patches, Wrap

logger = logging.getLogger(__name__)

__all__ = ["disable", "enable", "enabled", "held_key", "owner", "restore_one"]

HELD_PREFIX = "resilience.inflight."
#: zset: worker owner name -> its last heartbeat (Redis time, seconds).
OWNERS_KEY = "resilience.owners"


@dataclasses.dataclass
class Held:
    """A message of a closed channel that is neither acked nor restored yet."""

    message: Any  # kombu's Message (its _raw payload is the in-memory copy)
    run_id: str | None  # Redis's run_id when it was fetched
    request: Any = None  # weakref to the Celery request still running it, or None


class _Registry:
    """The process-wide bookkeeping. Shared by the main thread and the reclaimer."""

    def __init__(self) -> None:
        # Reentrant: a kombu QoS that the garbage collector finalizes restores its
        # messages (restore_unacked below), in whatever thread the collection runs, which
        # may be holding this lock at that moment.
        self.lock = threading.RLock()
        self.owner = ""
        self.channels: weakref.WeakSet[Any] = weakref.WeakSet()  # channels that fetch
        self.limbo: dict[str, Held] = {}

    def reset_owner(self, name: str) -> None:
        self.owner = f"{name}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


_registry = _Registry()


def owner() -> str:
    """This process's owner id: ``<worker hostname>.<pid>.<random>``."""
    if not _registry.owner:
        _registry.reset_owner(socket.gethostname())
    return _registry.owner


def held_key(of: str | None = None) -> str:
    """The in-flight hash of ``of`` (default: this process), without kombu's key prefix."""
    return HELD_PREFIX + (of or owner())


def track(channel: Any, chan_id: str, run_id: str | None) -> None:
    """Called by the fetch when ``channel`` starts fetching."""
    channel.__dict__["_resilience_chan"] = (chan_id, run_id)
    with _registry.lock:
        _registry.channels.add(channel)


def open_channels() -> list[Any]:
    """Fetching channels that still hold their deliveries (closing ones included)."""
    with _registry.lock:
        return [c for c in _registry.channels if _live(c)]


def _live(channel: Any) -> bool:
    # A closing channel holds its deliveries until restore_unacked has moved them to the
    # limbo (kombu skips that call when it delivered nothing).
    if channel.__dict__.get("_resilience_restoring"):
        # Its restore is under way (10 000 messages take seconds): the reclaimer must not
        # take those entries for lost replies and restore them a second time meanwhile.
        return True
    if channel.__dict__.get("_resilience_settled"):
        return False
    qos = channel.__dict__.get("_qos")
    return not channel.closed or bool(qos is not None and qos._delivered)


def live_ids() -> set[str]:
    """Ids of the channels whose in-flight entries are theirs to settle, not the reclaimer's."""
    return {c.__dict__["_resilience_chan"][0] for c in open_channels()}


def limbo() -> dict[str, Held]:
    """A snapshot of the limbo."""
    with _registry.lock:
        return dict(_registry.limbo)


def forget(tags: Iterable[str]) -> None:
    with _registry.lock:
        for tag in tags:
            _registry.limbo.pop(tag, None)


# -- what runs now ----------------------------------------------------------------------------


def running() -> dict[str, Any]:
    """Delivery tag -> Celery request, for every task handed to this worker's pool."""
    try:
        from celery.worker import state
    except ImportError:  # pragma: no cover - celery is a dependency
        return {}
    requests = _snapshot(state.active_requests) + _snapshot(state.reserved_requests)
    active = set(map(id, _snapshot(state.active_requests)))
    out = {}
    for request in requests:
        if id(request) in active or getattr(request, "_apply_result", None) is not None:
            tag = getattr(getattr(request, "_message", None), "delivery_tag", None)
            if tag is not None:
                out[str(tag)] = request
    return out


def still_running(held: Held) -> bool:
    """Whether the pool still runs this limbo entry's task and will report back on it.

    Then Celery acks (or rejects) the message when the result comes in. A job the pool
    no longer tracks brings no ack: its message goes back to its queue.
    """
    request = held.request() if held.request is not None else None
    if request is None or getattr(request, "acknowledged", False):
        return False
    ref = getattr(request, "_apply_result", None)
    job = ref() if ref is not None else None
    table = getattr(job, "_cache", None)
    if table is not None:  # a billiard (prefork) job: tracked while in the pool's table
        return table.get(getattr(job, "_job", None)) is job
    from celery.worker import state  # other pools: active until the task is done

    return any(other is request for other in _snapshot(state.active_requests))


def _snapshot(items: Any) -> list[Any]:
    # Read from the reclaimer thread while the main thread adds and removes.
    for _ in range(10):
        try:
            return list(items)
        except RuntimeError:  # changed size during iteration
            continue
    return []


def held_tags() -> list[str]:
    """Tags this process still needs: open channels' deliveries and running limbo ones."""
    tags: list[str] = []
    for channel in open_channels():
        qos = channel.__dict__.get("_qos")
        if qos is not None:
            tags.extend(str(tag) for tag in _snapshot(qos._delivered))
    tags.extend(tag for tag, held in limbo().items() if still_running(held))
    return tags


# -- restoring one message --------------------------------------------------------------------


def run_id(client: Any) -> str | None:
    try:
        return client.info("server").get("run_id")  # type: ignore[no-any-return]
    except Exception as exc:  # INFO renamed or refused: no data-loss detection
        if isinstance(exc, connection_errors()):
            raise
        return None


def restore_one(qos: Any, tag: str, message: Any, client: Any, *, lost: bool) -> None:
    """Put message ``tag`` back in its queue, as kombu's ``QoS.restore_by_tag`` does.

    If Redis no longer records it and ``lost`` (Redis lost data since it was fetched),
    the in-memory ``message`` is pushed back instead, so the work is not lost with Redis.
    """

    def restore_transaction(pipe: Any) -> None:
        record = pipe.hget(qos.unacked_key, tag)
        pipe.multi()
        qos._remove_from_indices(tag, pipe)
        if record:
            payload, exchange, routing_key = decoded(record)
        elif lost and message is not None:
            info = message.delivery_info or {}
            payload, exchange, routing_key = (
                copy.deepcopy(message._raw),
                info.get("exchange"),
                info.get("routing_key"),
            )
            logger.warning("resilience: Redis lost message %s; pushed back from memory", tag)
        else:  # acked, or restored by someone else already
            return
        qos.channel._do_restore_message(payload, exchange, routing_key, pipe, False)

    client.transaction(restore_transaction, qos.unacked_key)


def decoded(raw: Any) -> Any:
    """kombu's JSON of a Redis reply (bytes or str), as kombu decodes it."""
    from kombu.utils.json import loads

    return cast("Callable[[str], Any]", loads)(text(raw))  # kombu ships no annotations


def text(raw: Any) -> str:
    from kombu.utils.encoding import bytes_to_str

    return cast("Callable[[Any], str]", bytes_to_str)(raw)


def connection_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError, OSError)


# -- the patches ------------------------------------------------------------------------------


def _patched_connparams(original: Callable[..., Any]) -> Callable[..., Any]:
    # Connection.collect() sets transport.client = None, and closing the channel sets
    # channel.connection = None; every pool the channel builds after that (to restore at
    # close, to ack a task that outlived the connection) fails with AttributeError, which
    # no caller catches. Build it from the connection info the channel was created with.
    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is not None and transport.client is not None:
            self.__dict__["_resilience_conninfo"] = (transport.client, transport.default_port)
            return original(self, asynchronous)
        saved = self.__dict__.get("_resilience_conninfo")
        if saved is None:
            return original(self, asynchronous)
        client, port = saved
        return original(_Rebound(self, SimpleNamespace(client=client, default_port=port)),
                        asynchronous)  # fmt: skip

    _connparams.__wrapped__ = original  # type: ignore[attr-defined]
    return _connparams


def _patched_on_connection_disconnect(original: Callable[..., Any]) -> Callable[..., Any]:
    # kombu < 5.7 stops the event loop's polling (loop.on_tick.remove(on_poll_start)) when
    # any connection of any channel of the transport disconnects. redis-py disconnects a
    # connection again when the collector frees it (Connection.__del__), and the channels
    # a reconnecting consumer failed to open (their ping failed while Redis was down; kombu
    # < 5.4 reports them all) or closed belong to the same transport: freed later, they
    # stop the *live* consumer's polling. The worker stays up and answers inspect, and
    # never fetches again (celery/celery#8030; kombu#2007 and #2492 upstream). Seen here
    # on Python 3.13 x kombu 5.3: a worker that held 1 500 ETA tasks through a Redis
    # restart took back 34 and stopped. Only a channel the poller still serves reports;
    # one it no longer serves is forgotten by the poller, which would otherwise hand the
    # loop its closed sockets on the next tick (EBADF). kombu 5.7 does both (#2492, #2630).
    def _on_connection_disconnect(self: Any, connection: Any) -> None:
        cycle = getattr(self.connection, "cycle", None)
        if cycle is None or self in cycle._channels:
            original(self, connection)
            return
        if self._in_poll is connection:  # the channel's own state, as kombu clears it
            self._in_poll = None
        if self._in_listen is connection:
            self._in_listen = None
        for key in [key for key in cycle._chan_to_sock if key[0] is self]:
            del cycle._chan_to_sock[key]
        for fd in [fd for fd, (chan, _) in cycle._fd_to_chan.items() if chan is self]:
            del cycle._fd_to_chan[fd]

    _on_connection_disconnect.__wrapped__ = original  # type: ignore[attr-defined]
    return _on_connection_disconnect


class _Rebound:
    """The channel as kombu's ``_connparams`` reads it, with its transport's info back."""

    def __init__(self, channel: Any, connection: Any) -> None:
        self._channel = channel
        self.connection = connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


def _patched_close_connection(original: Callable[..., Any]) -> Callable[..., Any]:
    # kombu closes the transport's channels one after the other and stops at the first
    # close that raises: with Redis down, the remote-control channel's close (deleting its
    # auto-delete queue) raises, and the consumer's channel after it is never closed, so
    # what it delivered is never handed back (Celery <= 5.6 does not close it later).
    # kombu pops each channel before closing it: calling again goes on with the rest.
    def close_connection(self: Any, connection: Any) -> Any:
        first: BaseException | None = None
        for _ in range(len(self.channels) + len(self._avail_channels) + 1):
            try:
                original(self, connection)
                break
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first

    close_connection.__wrapped__ = original  # type: ignore[attr-defined]
    return close_connection


def _patched_flush(original: Callable[..., Any]) -> Callable[..., Any]:
    # On a lost connection Celery forgets the pool's jobs ("they can't be acked anyway":
    # with kombu alone the ack would crash on the collected transport): <= 5.6 all of
    # them, 5.7 those not yet accepted, even when written to a busy child, which will run
    # them. Such a task is never acked; kombu runs it again after the visibility timeout.
    # Its ack works now (see _patched_connparams), so keep every job a child has or is
    # being sent; the ones still waiting in the outbound buffer are dropped, and handed back.
    def flush(self: Any) -> Any:
        sent = {k: job for k, job in self._cache.items() if _sent(self, job)}
        try:
            return original(self)
        finally:
            for key, job in sent.items():
                self._cache.setdefault(key, job)

    flush.__wrapped__ = original  # type: ignore[attr-defined]
    return flush


def _sent(pool: Any, job: Any) -> bool:
    if getattr(job, "_accepted", False):
        return True
    # With synack Celery cancels (NACKs) unaccepted jobs: the child will not run them.
    return not getattr(pool, "synack", False) and getattr(job, "_write_to", None) is not None


def _patched_remove(original: Callable[..., Any]) -> Callable[..., Any]:
    # ack, reject and restore_by_tag all end here: the one place to forget the message
    # in the in-flight hash too (same pipeline, no extra round trip).
    def _remove_from_indices(self: Any, delivery_tag: Any, pipe: Any = None) -> Any:
        pipe = original(self, delivery_tag, pipe)
        tag = str(delivery_tag)
        with _registry.lock:
            _registry.limbo.pop(tag, None)
        return pipe.hdel(held_key(), tag)

    _remove_from_indices.__wrapped__ = original  # type: ignore[attr-defined]
    return _remove_from_indices


def _patched_restore_unacked(original: Callable[..., Any]) -> Callable[..., Any]:
    # A closing channel restores what it delivered. Only the messages no pool process
    # runs now go back; the rest (and all of them when Redis is unreachable) wait in the
    # limbo, from where the reclaimer restores them (or their ack removes them).
    def restore_unacked(self: Any, client: Any = None) -> Any:
        chan = self.channel.__dict__.get("_resilience_chan")
        if chan is None:
            return original(self, client)
        state = self.channel.__dict__
        state["_resilience_restoring"] = True
        try:
            _restore_delivered(self, chan[1], client)
        finally:
            if self.channel.closed:
                state["_resilience_settled"] = True
            state.pop("_resilience_restoring", None)
        return None

    restore_unacked.__wrapped__ = original  # type: ignore[attr-defined]
    return restore_unacked


def _restore_delivered(qos: Any, fetched_run_id: str | None, client: Any) -> None:
    delivered = list(qos._delivered.items())
    qos._delivered.clear()
    busy = {} if _terminating() else running()
    todo = []
    with _registry.lock:
        for tag, message in delivered:
            request = busy.get(str(tag))
            if request is not None:
                _registry.limbo[str(tag)] = Held(message, fetched_run_id, weakref.ref(request))
            else:
                todo.append((str(tag), message))
    restored = 0
    try:
        with qos.channel.conn_or_acquire(client) as client:
            lost = data_lost(fetched_run_id, run_id(client))
            for tag, message in todo:
                restore_one(qos, tag, message, client, lost=lost)
                restored += 1
    except Exception as exc:  # never lose them, whatever failed: the reclaimer retries
        with _registry.lock:
            for tag, message in todo[restored:]:
                _registry.limbo[tag] = Held(message, fetched_run_id)
        unexpected = not isinstance(exc, connection_errors() + tuple(qos.channel.connection_errors))
        logger.warning(
            "resilience: %d message(s) could not be restored now (%s); they are restored "
            "once Redis answers", len(todo) - restored, exc, exc_info=unexpected,
        )  # fmt: skip
    if busy and delivered:
        logger.info("resilience: %d running task(s) keep their message until they finish",
                    sum(1 for tag, _ in delivered if str(tag) in busy))  # fmt: skip


def data_lost(before: str | None, now: str | None) -> bool:
    """Whether Redis may have lost data since ``before`` (its run_id changes on restart)."""
    return before is not None and now is not None and before != now


def _terminating() -> bool:
    # A cold shutdown has killed the pool: nothing runs any more.
    try:
        from celery.worker import state
    except ImportError:  # pragma: no cover
        return False
    return state.should_terminate not in (None, False)


# -- enable / disable -------------------------------------------------------------------------

_patches = Patches()


def _targets() -> list[tuple[Any, str, Wrap]]:
    import kombu
    from celery.concurrency.asynpool import AsynPool
    from kombu.transport.redis import Channel, QoS, Transport

    targets: list[tuple[Any, str, Wrap]] = [
        (Channel, "_connparams", _patched_connparams),
        (QoS, "restore_unacked", _patched_restore_unacked),
        (QoS, "_remove_from_indices", _patched_remove),
        (Transport, "close_connection", _patched_close_connection),  # inherited (virtual)
        (AsynPool, "flush", _patched_flush),
    ]
    if tuple(kombu.VERSION[:2]) < (5, 7):  # 5.7 no longer stops polling on a disconnect
        targets.append((Channel, "_on_connection_disconnect", _patched_on_connection_disconnect))
    return targets


def enable(name: str | None = None) -> None:
    """Patch kombu's Redis transport; ``name`` (a worker's hostname) names the owner."""
    if name and not _registry.owner:
        _registry.reset_owner(name)
    _patches.apply(_targets())


def disable() -> None:
    """Undo :func:`enable` and forget the limbo (tests)."""
    _patches.undo()
    with _registry.lock:
        _registry.limbo.clear()


def enabled() -> bool:
    return bool(_patches)
