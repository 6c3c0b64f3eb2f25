"""Fetch: a message moves from its queue list into kombu's ``unacked`` hash in one step.

kombu's Redis transport takes a message with ``BRPOP`` and records it in the ``unacked``
hash afterwards, in a second round trip (``QoS.append``). If the connection breaks in
between (a reset eats the BRPOP reply; Redis restarts before the record is written), the
message is in neither place: it is lost, whatever the task class (DESIGN.md §1.4).

Here the pop and the record are one Lua script (:data:`FETCH_SCRIPT`): it pops from the
first non-empty list in kombu's own BRPOP order and, in the same atomic step, writes the
``unacked`` entry kombu would have written, its ``unacked_index`` score and this
worker's in-flight entry (:mod:`~celery_resilience.inflight`). A reply lost on the way
leaves the message recorded, and the worker that fetched it (or, if that worker died,
another one) puts it back (:mod:`~celery_resilience.reclaim`).

Scripts cannot block, and Redis has no blocking command that moves from several lists.
So a fetch that finds nothing is followed by a *wait*: ``BLMOVE key key RIGHT RIGHT
<fetch_wait>`` (a rotation of a list onto itself, which moves nothing), pipelined with the
next fetch, on the most urgent list of the queue the last message came from (its first
list in kombu's order: with priorities, an idle worker that had been draining ``q:9``
must wake for ``q``, not sit out the wait first). A message pushed to that list wakes
the worker at once; one pushed to another list waits at most ``resilience_fetch_wait``.
A busy worker never waits: each fetch that returns a message is followed by another.

The patches are on ``kombu.transport.redis.Channel._brpop_start``/``_brpop_read`` (the
only code that sends and reads the BRPOP) and ``QoS.append`` (which would write the
record a second time). A channel steps aside (vanilla BRPOP, one warning) where the
fetch cannot run: Redis < 6.2, or scripting refused (ACL, a Redis-compatible server
without Lua). A message taken by a ``no_ack`` consumer is never appended to the QoS: its
record is removed again at once. :func:`disable` undoes every patch.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from queue import Empty  # what kombu's _brpop_read raises for "nothing there"
from typing import Any, Callable, Optional, cast

from . import inflight
from ._patch import Patches, Wrap

logger = logging.getLogger(__name__)

__all__ = ["FETCH_SCRIPT", "FetchOptions", "disable", "enable", "enabled", "options_from"]

# KEYS: the queue lists in kombu's BRPOP order, then unacked, unacked_index, the worker's
#       in-flight hash, the quarantine list and the owners zset (reclaim.OWNERS_KEY).
# ARGV: the unacked_index score (kombu uses the client's clock), the fetching channel's id,
#       the worker's owner name.
# Returns {list, payload, 1} for a recorded message, {list, payload, 0} for one this
# script could not read (moved to quarantine: kombu would have lost it), or nil.
# The owner is registered here too (if its heartbeat has not yet): a worker killed before
# its first heartbeat still has its messages recovered.
FETCH_SCRIPT = r"""
local n = #KEYS - 5
local unacked, index, held, quarantine = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3], KEYS[n + 4]
for i = 1, n do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, payload = pcall(cjson.decode, item)
    local props = ok and type(payload) == 'table' and payload['properties']
    local info = type(props) == 'table' and props['delivery_info']
    local tag = type(props) == 'table' and props['delivery_tag']
    local ex = type(info) == 'table' and info['exchange']
    local rk = type(info) == 'table' and info['routing_key']
    local plain = function(v) return type(v) == 'string' or v == cjson.null end
    if type(tag) ~= 'string' or not plain(ex) or not plain(rk) then
      redis.call('LPUSH', quarantine, item)
      return {KEYS[i], item, 0}
    end
    -- kombu's QoS.append writes dumps([payload, exchange, routing_key]).
    redis.call('HSET', unacked, tag,
               '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
    redis.call('ZADD', index, ARGV[1], tag)
    redis.call('HSET', held, tag, ARGV[2])
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[n + 5], 'NX', tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[3])
    return {KEYS[i], item, 1}
  end
end
return nil
"""

# BLMOVE (the wait) needs Redis 6.2.
_MIN_REDIS = (6, 2)


@dataclasses.dataclass(frozen=True)
class FetchOptions:
    """What the fetch and the reclaimer need from the settings."""

    wait: float = 0.2  # seconds an idle fetch waits on one list before polling the others
    heartbeat: float = 2.0  # seconds between the reclaimer's heartbeats
    orphan_timeout: float = 30.0  # a worker silent this long has its messages recovered
    quarantine_queue: str = "resilience.quarantine"


def options_from(settings: Any) -> FetchOptions | None:
    """The options the settings ask for; None when ``resilience_fetch`` is off."""
    if not settings.fetch:
        return None
    return FetchOptions(
        settings.fetch_wait, settings.fetch_heartbeat, settings.fetch_orphan_timeout,
        settings.quarantine_queue,
    )  # fmt: skip


@dataclasses.dataclass
class _ChannelFetch:
    """Per channel: the script, the keys, and the state of the outstanding fetch."""

    sha: str
    prefix: str
    run_id: str | None  # Redis's run_id when the channel started fetching
    options: FetchOptions
    chan_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])
    pending: int = 0  # replies owed by the outstanding fetch (0: none sent by us)
    wait_next: bool = False  # the last fetch found nothing: wait before the next
    last_key: str | None = None  # the list the last message came from
    recorded: str | None = None  # delivery tag the fetch recorded, for QoS.append


# -- the patched kombu methods ----------------------------------------------------------------


def _fetch_state(channel: Any) -> _ChannelFetch | None:
    """The channel's fetch state, registering it on first use; None: vanilla BRPOP."""
    state = channel.__dict__.get("_resilience_fetch")
    if state is None:
        state = _register(channel)
        channel.__dict__["_resilience_fetch"] = state
    return state or None


def _register(channel: Any) -> _ChannelFetch | bool:
    options = _options()
    if options is None:
        return False
    with channel.conn_or_acquire() as client:
        try:
            info = client.info("server")
            version = tuple(int(p) for p in str(info.get("redis_version", "0")).split(".")[:2])
            if version < _MIN_REDIS:
                _step_aside(f"Redis {info.get('redis_version')} < 6.2 has no BLMOVE")
                return False
            sha = client.script_load(FETCH_SCRIPT)
        except channel.ResponseError as exc:  # ACL, scripting disabled, renamed commands
            _step_aside(f"Redis refused the fetch script ({exc})")
            return False
    state = _ChannelFetch(str(sha), getattr(channel, "global_keyprefix", "") or "",
                          info.get("run_id"), options)  # fmt: skip
    inflight.track(channel, state.chan_id, state.run_id)
    return state


_aside_warned = threading.Event()


def _step_aside(why: str) -> None:
    if not _aside_warned.is_set():
        _aside_warned.set()
        logger.warning("resilience: atomic fetch off (%s); using kombu's BRPOP, which can "
                       "lose a message when the connection breaks mid-fetch", why)  # fmt: skip


def _patched_start(original: Callable[..., Any]) -> Callable[..., Any]:
    # kombu sends BRPOP here and nowhere else; the poller reads the reply through
    # _brpop_read when the socket is readable. Sending the fetch script instead keeps the
    # poller, prefetch limits and health checks exactly as they are.
    def _brpop_start(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _fetch_state(self)
        if state is None:
            return original(self, *args, **kwargs)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()  # kombu >= 5.7's BRPOP health check reads it
        connection.send_packed_command(connection.pack_commands(_commands(self, state, keys)))
        return None

    _brpop_start.__wrapped__ = original  # type: ignore[attr-defined]
    return _brpop_start


def _commands(channel: Any, state: _ChannelFetch, keys: list[str]) -> list[tuple[Any, ...]]:
    options = state.options
    p = state.prefix
    commands: list[tuple[Any, ...]] = []
    if state.wait_next:
        key = p + _wait_key(state.last_key, keys, channel.sep)
        commands.append(("BLMOVE", key, key, "RIGHT", "RIGHT", _wait(channel, options)))
    own = (channel.unacked_key, channel.unacked_index_key, inflight.held_key(),
           options.quarantine_queue, inflight.OWNERS_KEY)  # fmt: skip
    commands.append((
        "EVALSHA", state.sha, len(keys) + len(own), *(p + key for key in (*keys, *own)),
        repr(time.time()), state.chan_id, inflight.owner(),
    ))  # fmt: skip
    state.pending = len(commands)
    return commands


def _wait(channel: Any, options: FetchOptions) -> str:
    # Never longer than kombu's BRPOP timeout: its health check expects a reply by then.
    timeout = getattr(channel, "brpop_timeout", 1) or 1
    return repr(max(0.01, min(options.wait, timeout)))


def _patched_read(original: Callable[..., Any]) -> Callable[..., Any]:
    def _brpop_read(self: Any, **options: Any) -> Any:
        state = self.__dict__.get("_resilience_fetch")
        if not state or not state.pending:
            return original(self, **options)
        try:
            reply = _read_replies(self, state, options)
            if reply:
                return _deliver(self, state, reply)
            state.wait_next = True
            raise Empty()
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7
            if flush is not None:
                flush()

    _brpop_read.__wrapped__ = original  # type: ignore[attr-defined]
    return _brpop_read


def _read_replies(channel: Any, state: _ChannelFetch, options: dict[str, Any]) -> Any:
    """Every reply the fetch owes (the wait's, then the script's); the script's."""
    pending, state.pending = state.pending, 0
    reply: Any = None
    for i in range(pending):
        try:
            reply = channel.client.parse_response(channel.client.connection, "EVALSHA", **options)
        except channel.connection_errors:
            channel.client.connection.disconnect()  # as kombu: reconnect on the next poll
            raise
        except channel.ResponseError as exc:
            reply = None
            if i == pending - 1:  # the script's own error: it moved nothing
                _script_failed(channel, state, exc)
    return reply


def _wait_key(last: str | None, keys: list[str], sep: str) -> str:
    """The list an idle fetch waits on: the first of ``last``'s queue in ``keys``.

    kombu orders the keys by priority step, then queue (``q``, ``r``, ``q<sep>3``, ...),
    so the first key of a queue is its most urgent list.
    """
    if last in keys:
        queue = _queue_of(last, sep)
        return next(key for key in keys if _queue_of(key, sep) == queue)
    return keys[0]


def _queue_of(key: str, sep: str) -> str:
    """The queue of one of kombu's lists (``q`` or ``q<sep><priority>``)."""
    return key.rsplit(sep, 1)[0]


def _script_failed(channel: Any, state: _ChannelFetch, exc: Exception) -> None:
    if "NOSCRIPT" in str(exc):  # the script cache was flushed (a Redis restart)
        with channel.conn_or_acquire() as client:
            state.sha = str(client.script_load(FETCH_SCRIPT))
        return
    _step_aside(f"the fetch script failed: {exc}")
    channel.__dict__["_resilience_fetch"] = False


def _deliver(channel: Any, state: _ChannelFetch, reply: Any) -> bool:
    key = inflight.text(reply[0])[len(state.prefix) :]
    dest = _queue_of(key, channel.sep)
    channel._queue_cycle.rotate(dest)
    state.last_key, state.wait_next = key, False
    if not int(reply[2]):
        logger.warning(
            "resilience: an unreadable message in %r was moved to the quarantine queue %r "
            "(kombu would have dropped it)", dest, state.options.quarantine_queue,
        )  # fmt: skip
        return True
    payload = inflight.decoded(reply[1])
    tag = state.recorded = payload["properties"]["delivery_tag"]
    try:
        channel.connection._deliver(payload, dest)
    except BaseException:
        # Left recorded: once this channel is gone the reclaimer puts the message back.
        state.recorded = None
        raise
    if state.recorded == tag:  # delivered but never appended to the QoS: a no_ack consumer
        state.recorded = None
        channel.qos._remove_from_indices(tag).execute()
    return True


def _patched_append(original: Callable[..., Any]) -> Callable[..., Any]:
    # The fetch script has already written what kombu's QoS.append writes to Redis; only
    # the in-memory bookkeeping (virtual QoS.append) is left to do.
    from kombu.transport.virtual.base import QoS as VirtualQoS

    in_memory = cast("Callable[..., Any]", VirtualQoS.append)  # kombu ships no annotations

    def append(self: Any, message: Any, delivery_tag: Any) -> Any:
        state = self.channel.__dict__.get("_resilience_fetch")
        if state and state.recorded == delivery_tag:
            state.recorded = None
            return in_memory(self, message, delivery_tag)
        return original(self, message, delivery_tag)

    append.__wrapped__ = original  # type: ignore[attr-defined]
    return append


# -- enable / disable -------------------------------------------------------------------------

_Provider = Callable[[], Optional[FetchOptions]]
_provider: _Provider | None = None
_patches = Patches()


def _options() -> FetchOptions | None:
    try:
        return _provider() if _provider is not None else None
    except Exception:  # a bad setting must not break consuming
        logger.exception("resilience: fetch settings unavailable; using kombu's BRPOP")
        return None


def _targets() -> list[tuple[Any, str, Wrap]]:
    from kombu.transport.redis import Channel, QoS

    return [
        (Channel, "_brpop_start", _patched_start),
        (Channel, "_brpop_read", _patched_read),
        (QoS, "append", _patched_append),
    ]


def enable(provider: _Provider) -> None:
    """Fetch atomically on every kombu Redis channel that consumes in this process.

    ``provider`` is called when a channel starts consuming and may return None to leave
    it on kombu's BRPOP. Calling ``enable`` again only replaces it.
    """
    global _provider
    _provider = provider
    _patches.apply(_targets())


def disable() -> None:
    """Undo :func:`enable`. Channels that are consuming keep fetching until they close."""
    global _provider
    _provider = None
    _patches.undo()


def enabled() -> bool:
    return bool(_patches)
