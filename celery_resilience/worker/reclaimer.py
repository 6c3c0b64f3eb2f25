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

:meth:`Reclaimer.stop` runs a last pass (everything the ledger keeps goes back: the pool
has stopped) and unregisters the worker once it holds nothing. Every message it restores
is logged with its task and the reason (``connection lost``, ``lost fetch reply``,
``dead worker``, ``shutdown``; ``copy from memory`` when Redis had lost it).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..redis import keys, restore
from ..redis.fetch import FetchOptions
from .ledger import Ledger, lost_since

logger = logging.getLogger(__name__)

__all__ = ["Reclaimer"]

_CHUNK = 500  # members per ZADD when renewing leases
_SOCKET_TIMEOUT = 10.0  # seconds; the thread's own connection only


class Reclaimer:
    """Heartbeat, leases, reclaim and orphan recovery for one worker (see the module doc)."""

    def __init__(self, app: Any, options: FetchOptions, ledger: Ledger) -> None:
        self.app = app
        self.options = options
        self.ledger = ledger
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
                if isinstance(exc, self.ledger.connection_errors) or failing:
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
        owner = self.ledger.owner
        run = self.ledger.run_id(client)  # once per pass: renewals and data-loss checks read it
        if final:
            self._reclaim(channel, client, prefix, run, final=True)
            client.eval(keys.script("retire"), 2, prefix + keys.OWNERS,
                        prefix + keys.inflight(owner), owner)  # fmt: skip
            return
        now = float(client.eval(keys.script("heartbeat"), 1, prefix + keys.OWNERS, owner))
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
        tags = self.ledger.held_tags()
        now = time.time()  # kombu scores the unacked index with the client's clock
        for i in range(0, len(tags), _CHUNK):
            if i:
                time.sleep(0.001)  # let the consumer's thread run between chunks
            chunk = {tag: now for tag in tags[i : i + _CHUNK]}
            client.zadd(prefix + channel.unacked_index_key, chunk, xx=True)

    def _reclaim(
        self, channel: Any, client: Any, prefix: str, run: str | None, final: bool = False
    ) -> None:
        kept = self.ledger.kept()
        reason = restore.SHUTDOWN if final else restore.CONNECTION_LOST
        for tag, entry in kept.items():
            if final or not self.ledger.still_running(entry):
                channel.qos.restore_by_tag(tag, _kombu(channel), reason=reason,
                                           message=entry.message,
                                           lost=lost_since(entry.run_id, run))  # fmt: skip
                self.ledger.forget(tag)
        self._reclaim_lost_replies(channel, client, prefix, set(kept), final)

    def _reclaim_lost_replies(
        self, channel: Any, client: Any, prefix: str, skip: set[str], final: bool
    ) -> None:
        """Messages a fetch recorded for a channel that is gone but never delivered."""
        live = self.ledger.live_ids()
        gone = self._live is None or bool(self._live - live) or bool(self._unheld)
        self._live = live
        if not (gone or final):
            return  # no channel closed since the last pass: nothing can be left over
        entries = client.hgetall(prefix + keys.inflight(self.ledger.owner))
        leftovers = {
            tag for tag, chan in map(_pair, entries.items()) if chan not in live and tag not in skip
        }
        # Seen on two passes in a row: a kept message written meanwhile cannot be missed.
        due = leftovers if final else leftovers & self._unheld
        self._unheld = leftovers - due
        for tag in due:
            channel.qos.restore_by_tag(tag, _kombu(channel), reason=restore.LOST_FETCH_REPLY)

    def _recover_orphans(self, channel: Any, client: Any, prefix: str, now: float) -> None:
        dead = client.zrangebyscore(
            prefix + keys.OWNERS, "-inf", f"({now - self.options.orphan_timeout}"
        )
        for name in map(restore.text, dead):
            if name == self.ledger.owner:
                continue
            lock = prefix + keys.RECOVERING_PREFIX + name
            if not client.set(lock, self.ledger.owner, nx=True, ex=60):
                continue  # another worker is on it
            try:
                self._recover(channel, client, prefix, name)
            finally:
                client.delete(lock)

    def _recover(self, channel: Any, client: Any, prefix: str, name: str) -> None:
        key = prefix + keys.inflight(name)
        tags = [restore.text(tag) for tag in client.hkeys(key)]
        for tag in tags:
            channel.qos.restore_by_tag(tag, _kombu(channel), reason=restore.DEAD_WORKER)
            client.hdel(key, tag)
        client.eval(keys.script("retire"), 2, prefix + keys.OWNERS, key, name)
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
    return restore.text(item[0]), restore.text(item[1])
