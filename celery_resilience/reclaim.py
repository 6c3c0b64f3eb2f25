"""The reclaimer: a worker thread that puts back what nobody holds any more.

Every ``resilience_fetch_heartbeat`` seconds, in the worker's main process (a thread, so
that a long task under ``-P solo`` cannot stall it), on a broker connection of its own:

1. **Heartbeat.** ``ZADD resilience.owners <Redis time> <owner>``: this worker is alive.
2. **Leases.** The ``unacked_index`` score of every message this worker holds (prefetched,
   waiting for its ETA, running) is renewed, so kombu's visibility-timeout sweep never
   restores a message that is still held: a long task or a long countdown is not
   delivered twice, whatever ``visibility_timeout`` is.
3. **Reclaim.** Messages of channels that closed (a lost connection) go back to their
   queue, unless a pool process still runs them: those wait for their ack. So do
   messages a lost fetch reply recorded but never delivered. After a connection loss,
   prefetched work is back in its queue within a heartbeat or two of Redis answering.
4. **Orphans.** A worker whose heartbeat is older than ``resilience_fetch_orphan_timeout``
   has died: its in-flight messages are restored (under a lock, by one worker). A worker
   only judges others after it has itself seen Redis for that long without a break, so
   an outage that silenced every worker makes none of them an orphan.

:meth:`Reclaimer.stop` runs a last pass (everything in the limbo goes back: the pool has
stopped) and unregisters the worker once it holds nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from . import inflight
from .fetch import FetchOptions

logger = logging.getLogger(__name__)

__all__ = ["OWNERS_KEY", "Reclaimer"]

OWNERS_KEY = inflight.OWNERS_KEY
_LOCK_PREFIX = "resilience.recovering."
_CHUNK = 500  # members per ZADD when renewing leases
_SOCKET_TIMEOUT = 10.0  # seconds; the thread's own connection only

# Redis's own clock, so that workers on hosts with skewed clocks agree on who is silent.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
return tostring(now)
"""
# Forget an owner that holds nothing (its in-flight hash is empty).
_RETIRE = """
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


class Reclaimer:
    """Heartbeat, leases, reclaim and orphan recovery for one worker (see the module doc)."""

    def __init__(self, app: Any, options: FetchOptions) -> None:
        self.app = app
        self.options = options
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._since: float | None = None  # monotonic time of the first good tick in a row
        self._unheld: set[str] = set()  # lost-reply candidates seen on the previous tick
        self._live: set[str] | None = None  # ids of the fetching channels on the last tick
        self._renewed: float | None = None  # monotonic time of the last lease renewal
        self._run_id: str | None = None  # the redis-server run the last renewal was on

    # -- lifecycle (a Celery StartStopStep's obj) ----------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="resilience-reclaimer",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.options.heartbeat * 5)
            self._thread = None
        try:
            self.tick(final=True)
        except Exception as exc:  # Redis down at shutdown: the orphan path takes over
            logger.warning("resilience: last reclaim pass failed (%s); another worker "
                           "recovers this worker's messages once its heartbeat is stale", exc)  # fmt: skip
        finally:
            self._close()

    terminate = stop

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self._interval()):
            try:
                self.tick()
                failing = False
            except Exception as exc:
                self._since = None
                # Renew at the first pass that works again: Redis may be back from a dump
                # whose scores are older than the lease it had.
                self._renewed = None
                if isinstance(exc, inflight.connection_errors()) or failing:
                    logger.debug("resilience: reclaim pass failed: %r", exc)
                else:  # not Redis being away: say so once per streak
                    logger.exception("resilience: reclaim pass failed; retrying every %ss",
                                     self._interval())  # fmt: skip
                failing = True

    def _interval(self) -> float:
        # Leases must be renewed well within kombu's visibility timeout.
        return min(self.options.heartbeat, self._visibility_timeout() / 3)

    # -- one pass ------------------------------------------------------------------------

    def tick(self, final: bool = False) -> None:
        """One heartbeat/lease/reclaim/orphan pass. ``final``: nothing runs any more."""
        channel = self._channel()
        client = _raw(channel)
        prefix = _prefix(channel)
        run = inflight.run_id(client)  # once per pass: renewals and data-loss checks read it
        if final:
            self._reclaim(channel, client, prefix, run, final=True)
            client.eval(_RETIRE, 2, prefix + OWNERS_KEY,
                        prefix + inflight.held_key(), inflight.owner())  # fmt: skip
            return
        now = float(client.eval(_HEARTBEAT, 1, prefix + OWNERS_KEY, inflight.owner()))
        if self._renewal_due() or run != self._run_id:  # a restarted Redis: scores of its dump
            self._renew(channel, client, prefix)
            self._renewed, self._run_id = time.monotonic(), run
        self._reclaim(channel, client, prefix, run)
        self._since = self._since or time.monotonic()
        if time.monotonic() - self._since >= self.options.orphan_timeout:
            self._recover_orphans(channel, client, prefix, now)

    def _renewal_due(self) -> bool:
        # Every visibility_timeout / 3, not every heartbeat: with passes at most that far
        # apart, a lease is renewed within 2/3 of the timeout of its last score. Renewing
        # 10 000 held messages costs the worker ~70 ms of CPU (the GIL, taken from the
        # consumer): every 2 s it delayed urgent tasks by up to 200 ms (benchmarks/).
        return self._renewed is None or (
            time.monotonic() - self._renewed >= self._visibility_timeout() / 3
        )

    def _renew(self, channel: Any, client: Any, prefix: str) -> None:
        tags = inflight.held_tags()
        now = time.time()  # kombu scores the unacked index with the client's clock
        for i in range(0, len(tags), _CHUNK):
            if i:
                time.sleep(0.001)  # let the consumer's thread run between chunks
            chunk = {tag: now for tag in tags[i : i + _CHUNK]}
            client.zadd(prefix + channel.unacked_index_key, chunk, xx=True)

    def _reclaim(
        self, channel: Any, client: Any, prefix: str, run: str | None, final: bool = False
    ) -> None:
        limbo = inflight.limbo()
        due = {t: h for t, h in limbo.items() if final or not inflight.still_running(h)}
        for tag, held in due.items():
            lost = inflight.data_lost(held.run_id, run)
            inflight.restore_one(channel.qos, tag, held.message, _kombu(channel), lost=lost)
            inflight.forget([tag])
        restored = len(due)
        restored += self._reclaim_lost_replies(channel, client, prefix, set(limbo), final)
        if restored:
            logger.info("resilience: reclaimed %d message(s) of a closed connection", restored)

    def _reclaim_lost_replies(
        self, channel: Any, client: Any, prefix: str, skip: set[str], final: bool
    ) -> int:
        """Messages a fetch recorded for a channel that is gone but never delivered."""
        live = inflight.live_ids()
        gone = self._live is None or bool(self._live - live) or bool(self._unheld)
        self._live = live
        if not (gone or final):
            return 0  # no channel closed since the last pass: nothing can be left over
        entries = client.hgetall(prefix + inflight.held_key())
        leftovers = {
            tag for tag, chan in map(_pair, entries.items()) if chan not in live and tag not in skip
        }
        # Seen on two passes in a row: a limbo entry written meanwhile cannot be missed.
        due = leftovers if final else leftovers & self._unheld
        self._unheld = leftovers - due
        for tag in due:
            inflight.restore_one(channel.qos, tag, None, _kombu(channel), lost=False)
        return len(due)

    def _recover_orphans(self, channel: Any, client: Any, prefix: str, now: float) -> None:
        dead = client.zrangebyscore(
            prefix + OWNERS_KEY, "-inf", f"({now - self.options.orphan_timeout}"
        )
        for name in map(inflight.text, dead):
            if name == inflight.owner():
                continue
            lock = prefix + _LOCK_PREFIX + name
            if not client.set(lock, inflight.owner(), nx=True, ex=60):
                continue  # another worker is on it
            try:
                self._recover(channel, client, prefix, name)
            finally:
                client.delete(lock)

    def _recover(self, channel: Any, client: Any, prefix: str, name: str) -> None:
        key = prefix + inflight.held_key(name)
        tags = [inflight.text(tag) for tag in client.hkeys(key)]
        for tag in tags:
            inflight.restore_one(channel.qos, tag, None, _kombu(channel), lost=False)
            client.hdel(key, tag)
        client.eval(_RETIRE, 2, prefix + OWNERS_KEY, key, name)
        if tags:
            logger.warning("resilience: worker %s stopped heartbeating; restored its %d "
                           "in-flight message(s)", name, len(tags))  # fmt: skip

    # -- the connection ------------------------------------------------------------------

    def _channel(self) -> Any:
        if self._conn is None:
            # A bounded socket timeout: a black-holed connection must not stall the thread.
            timeouts = {
                "socket_timeout": _SOCKET_TIMEOUT,
                "socket_connect_timeout": _SOCKET_TIMEOUT,
            }
            self._conn = self.app.connection_for_write(transport_options=timeouts)
        try:
            return self._conn.default_channel
        except Exception:
            self._close()
            raise

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # a dead connection: nothing to release
                pass

    def _visibility_timeout(self) -> float:
        options = self.app.conf.broker_transport_options or {}
        return float(options.get("visibility_timeout", 3600))


def _raw(channel: Any) -> Any:
    """A plain redis-py client on the channel's pool: keys are prefixed by hand."""
    import redis

    return redis.Redis(connection_pool=channel.pool)


def _kombu(channel: Any) -> Any:
    """kombu's own client for the channel (it prefixes keys as kombu does)."""
    return channel._create_client()


def _prefix(channel: Any) -> str:
    return getattr(channel, "global_keyprefix", "") or ""


def _pair(item: tuple[Any, Any]) -> tuple[str, str]:
    return inflight.text(item[0]), inflight.text(item[1])
