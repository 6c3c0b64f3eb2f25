"""The atomic fetch: a message moves from its queue list into ``unacked`` in one step.

kombu's Redis channel takes a message with ``BRPOP`` and records it in its ``unacked``
hash in a second round trip (``QoS.append``). A connection that breaks in between (a
reset eats the BRPOP reply; Redis restarts before the record is written) loses the
message, whatever the task class.

:class:`FetchMixin` sends one Lua script (``scripts/fetch.lua``) instead of the BRPOP. It
pops from the first non-empty list in kombu's own BRPOP order and, in the same atomic
step, writes the ``unacked`` record kombu would have written, its ``unacked_index`` score
and this worker's in-flight entry. A reply lost on the way leaves the message recorded,
and the worker that fetched it (or, if that worker died, another one) puts it back
(:mod:`celery_resilience.worker.reclaimer`).

Scripts cannot block, and Redis has no blocking command that moves from several lists.
So a fetch that finds nothing is followed by a *wait*, ``BLMOVE key key RIGHT RIGHT
<fetch_wait>`` (a list rotated onto itself: nothing moves), pipelined with the next fetch,
on the most urgent list of the queue the last message came from. A message pushed there
wakes the worker at once; one pushed to another list waits at most ``resilience_fetch_wait``.
A busy worker never waits.

A channel keeps kombu's BRPOP (one warning) where the fetch cannot run: no worker ledger
(a publisher), ``resilience_fetch`` off, Redis < 6.2 (no BLMOVE), or Redis refusing to load
the script (an ACL, a server without Lua). At run time, a flushed script cache (``SCRIPT
FLUSH``, a restart, a failover to a node that never loaded it: redis-py's
``NoScriptError``) loads the script again; any other script error is retried on the next
poll. The fetch never turns itself off once it runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from queue import Empty  # what kombu's _brpop_read raises for "nothing there"
from typing import Any

from redis.exceptions import NoScriptError

from .. import internals
from . import keys
from .restore import decoded, text

logger = logging.getLogger(__name__)

_MIN_REDIS = (6, 2)  # BLMOVE, the idle wait


@dataclasses.dataclass(frozen=True)
class FetchOptions:
    """What the fetch and the reclaimer take from the settings."""

    wait: float = 0.2  # seconds an idle fetch waits on one list before polling the others
    heartbeat: float = 2.0  # seconds between the reclaimer's passes
    orphan_timeout: float = 30.0  # a worker silent this long has its messages recovered
    quarantine_queue: str = "resilience.quarantine"


def options_from(settings: Any) -> FetchOptions | None:
    """The options the settings ask for; None when ``resilience_fetch`` is off."""
    if not settings.fetch:
        return None
    return FetchOptions(settings.fetch_wait, settings.fetch_heartbeat,
                        settings.fetch_orphan_timeout, settings.quarantine_queue)  # fmt: skip


@dataclasses.dataclass
class FetchState:
    """One fetching channel's script, keys and outstanding fetch."""

    sha: str
    prefix: str  # kombu's global_keyprefix
    run_id: str | None  # the redis-server run the channel started fetching on
    options: FetchOptions
    ledger: Any  # the worker's Ledger (worker/ledger.py)
    pending: int = 0  # replies owed by the outstanding fetch (0: none sent by us)
    wait_next: bool = False  # the last fetch found nothing: wait before the next
    last_key: str | None = None  # the list the last message came from
    recorded: str | None = None  # the delivery tag the fetch recorded, for QoS.append
    failing: bool = False  # the last script run failed (said once per streak)


#: Typed as Any: the mixins go on kombu's (unannotated) Channel and QoS.
_Mixin: Any = object


class FetchMixin(_Mixin):  # type: ignore[misc]
    """Channel mixin: the atomic fetch in place of kombu's BRPOP (see the module doc)."""

    _fetch: FetchState | None = None  # None: kombu's BRPOP
    _fetch_decided = False
    _chan_id: str = ""  # this channel's id in the in-flight hash
    _plugin: Any = None  # set by ChannelMixin

    def fetch_state(self) -> FetchState | None:
        """The fetch of this channel, started on first use; None: kombu's BRPOP."""
        if not self._fetch_decided:
            self._fetch_decided = True
            self._fetch = self._start_fetching()
        return self._fetch

    def _start_fetching(self) -> FetchState | None:
        ledger = getattr(self._plugin, "ledger", None)
        if ledger is None or not internals.available("fetch"):
            return None
        options = self._plugin.fetch_options()
        if options is None:
            return None
        with self.conn_or_acquire() as client:
            try:
                info = client.info("server")
                version = tuple(int(p) for p in str(info.get("redis_version", "0")).split(".")[:2])
                if version < _MIN_REDIS:
                    ledger.warn_once("fetch", _ASIDE, f"Redis {info.get('redis_version')} < 6.2")
                    return None
                sha = client.script_load(keys.script("fetch"))
            except self.ResponseError as exc:  # ACL, no Lua
                ledger.warn_once("fetch", _ASIDE, f"Redis refused the fetch script: {exc}")
                return None
        prefix = getattr(self, "global_keyprefix", "") or ""
        ledger.register(self)
        return FetchState(str(sha), prefix, info.get("run_id"), options, ledger)

    def _brpop_start(self, *args: Any, **kwargs: Any) -> Any:
        # kombu sends BRPOP here and nowhere else; the poller reads the reply through
        # _brpop_read when the socket is readable. Sending the fetch script instead keeps
        # the poller, prefetch limits and health checks exactly as they are.
        state = self.fetch_state()
        if state is None:
            return super()._brpop_start(*args, **kwargs)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        keys_ = [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()  # kombu >= 5.7's BRPOP health check reads it
        connection.send_packed_command(connection.pack_commands(self._commands(state, keys_)))
        return None

    def _commands(self, state: FetchState, lists: list[str]) -> list[tuple[Any, ...]]:
        p, options = state.prefix, state.options
        commands: list[tuple[Any, ...]] = []
        if state.wait_next:
            key = p + wait_key(state.last_key, lists, self.sep)
            commands.append(("BLMOVE", key, key, "RIGHT", "RIGHT", self._wait(options)))
        own = (self.unacked_key, self.unacked_index_key, keys.inflight(state.ledger.owner),
               options.quarantine_queue, keys.OWNERS)  # fmt: skip
        commands.append((
            "EVALSHA", state.sha, len(lists) + len(own), *(p + key for key in (*lists, *own)),
            repr(time.time()), self._chan_id, state.ledger.owner,
        ))  # fmt: skip
        state.pending = len(commands)
        return commands

    def _wait(self, options: FetchOptions) -> str:
        # Never longer than kombu's BRPOP timeout: its health check expects a reply by then.
        timeout = getattr(self, "brpop_timeout", 1) or 1
        return repr(max(0.01, min(options.wait, timeout)))

    def _brpop_read(self, **options: Any) -> Any:
        state = self._fetch
        if state is None or not state.pending:
            return super()._brpop_read(**options)
        try:
            reply = self._read_replies(state, options)
            if reply:
                return self._deliver_fetched(state, reply)
            state.wait_next = True
            raise Empty()
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7
            if flush is not None:
                flush()

    def _read_replies(self, state: FetchState, options: dict[str, Any]) -> Any:
        """Every reply the fetch owes (the wait's, then the script's); the script's."""
        client = self.client
        pending, state.pending = state.pending, 0
        reply: Any = None
        for i in range(pending):
            try:
                reply = client.parse_response(client.connection, "EVALSHA", **options)
            except self.connection_errors:
                client.connection.disconnect()  # as kombu: reconnect on the next poll
                raise
            except self.ResponseError as exc:
                reply = None
                if i == pending - 1:  # the script's own error: it moved nothing
                    self._script_failed(state, exc)
                continue
            if i == pending - 1 and state.failing:
                state.failing = False
                logger.info("resilience: the fetch script runs again")
        return reply

    def _script_failed(self, state: FetchState, exc: Exception) -> None:
        if isinstance(exc, NoScriptError):
            with self.conn_or_acquire() as client:
                state.sha = str(client.script_load(keys.script("fetch")))
            logger.info("resilience: Redis no longer had the fetch script (SCRIPT FLUSH, a "
                        "restart or a failover); loaded it again")  # fmt: skip
            return
        if not state.failing:  # READONLY, LOADING, BUSY, OOM...: Redis answers again soon
            state.failing = True
            logger.warning("resilience: the fetch script failed (%s); trying again", exc)

    def _deliver_fetched(self, state: FetchState, reply: Any) -> bool:
        key = text(reply[0])[len(state.prefix) :]
        dest = queue_of(key, self.sep)
        self._queue_cycle.rotate(dest)
        state.last_key, state.wait_next = key, False
        if not int(reply[2]):
            logger.warning("resilience: an unreadable message in %r was moved to the quarantine "
                           "queue %r (kombu would have dropped it)",
                           dest, state.options.quarantine_queue)  # fmt: skip
            return True
        payload = decoded(reply[1])
        tag = state.recorded = payload["properties"]["delivery_tag"]
        try:
            self.connection._deliver(payload, dest)
        except BaseException:
            # Left recorded: once this channel is gone, the reclaimer puts it back.
            state.recorded = None
            raise
        if state.recorded == tag:  # delivered, never appended to the QoS: a no_ack consumer
            state.recorded = None
            self.qos._remove_from_indices(tag).execute()
        return True


_ASIDE = ("resilience: atomic fetch off (%s); using kombu's BRPOP, which can lose a message "
          "when the connection breaks mid-fetch")  # fmt: skip


def wait_key(last: str | None, lists: list[str], sep: str) -> str:
    """The list an idle fetch waits on: the first of ``last``'s queue in ``lists``.

    kombu orders the lists by priority step, then queue (``q``, ``r``, ``q<sep>3``, ...),
    so a queue's first list is its most urgent one.
    """
    if last in lists:
        queue = queue_of(last, sep)
        return next(key for key in lists if queue_of(key, sep) == queue)
    return lists[0]


def queue_of(key: str, sep: str) -> str:
    """The queue of one of kombu's lists (``q`` or ``q<sep><priority>``)."""
    return key.rsplit(sep, 1)[0]
