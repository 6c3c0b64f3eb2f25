"""The ledger: everything a worker holds, in one object the worker's delivery step owns.

- **Who it is.** ``owner``: ``<hostname>.<pid>.<random>``, the name of its in-flight
  hash and its heartbeat in Redis.
- **Its fetching channels.** Each channel that fetches registers here; a channel answers
  for its deliveries while it is open, and while it closes, until what it delivered is
  restored or kept here (:meth:`.ChannelMixin.holds_deliveries`).
- **What it keeps.** Messages of a closed channel that are neither acked nor restored yet:
  tasks the pool still runs (their ack removes them), and messages Redis could not take
  back when the channel closed. The reclaimer restores them (worker/reclaimer.py), from
  the in-memory copy when Redis lost its record.

The main thread (the consumer) and the reclaimer thread share it. The lock is reentrant:
a kombu QoS the garbage collector finalizes restores its messages in whatever thread the
collection runs, which may hold the lock at that moment.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import uuid
import weakref
from typing import Any

import redis

from . import running as pool_state

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Kept:
    """A message of a closed channel, neither acked nor restored yet."""

    message: Any  # kombu's Message (its _raw payload is the in-memory copy)
    run_id: str | None  # the redis-server run it was fetched on
    request: Any = None  # weakref to the Celery request still running it, or None


class Ledger:
    """What one worker process holds (see the module doc)."""

    connection_errors: tuple[type[BaseException], ...] = (
        redis.ConnectionError, redis.TimeoutError, OSError,
    )  # fmt: skip

    def __init__(self, hostname: str) -> None:
        self.owner = f"{hostname}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.lock = threading.RLock()
        self._channels: weakref.WeakSet[Any] = weakref.WeakSet()
        self._kept: dict[str, Kept] = {}
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"<Ledger {self.owner}: {len(self._kept)} kept>"

    # -- channels ---------------------------------------------------------------------------

    def register(self, channel: Any) -> None:
        with self.lock:
            self._channels.add(channel)

    def channels(self) -> list[Any]:
        """The fetching channels that still answer for their deliveries."""
        with self.lock:
            return [c for c in self._channels if c.holds_deliveries()]

    def live_ids(self) -> set[str]:
        """Ids of the channels whose in-flight entries are theirs to settle."""
        return {channel._chan_id for channel in self.channels()}

    # -- kept messages ----------------------------------------------------------------------

    def keep(self, tag: str, message: Any, run_id: str | None, request: Any = None) -> None:
        with self.lock:
            self._kept[tag] = Kept(message, run_id, request)

    def kept(self) -> dict[str, Kept]:
        with self.lock:
            return dict(self._kept)

    def forget(self, tag: str) -> None:
        with self.lock:
            self._kept.pop(tag, None)

    def held_tags(self) -> list[str]:
        """Tags whose leases must be renewed: open channels' deliveries, running kept ones."""
        tags: list[str] = []
        for channel in self.channels():
            qos = channel.__dict__.get("_qos")
            if qos is not None:
                tags.extend(str(tag) for tag in pool_state.snapshot(qos._delivered))
        tags.extend(tag for tag, kept in self.kept().items() if self.still_running(kept))
        return tags

    # -- the worker around it ---------------------------------------------------------------

    running = staticmethod(pool_state.running)
    terminating = staticmethod(pool_state.terminating)
    stopping = staticmethod(pool_state.stopping)

    @staticmethod
    def still_running(kept: Kept) -> bool:
        return pool_state.still_running(kept.request)

    def run_id(self, client: Any) -> str | None:
        """The redis-server's run id (it changes when Redis restarts); None: unknown."""
        try:
            return client.info("server").get("run_id")  # type: ignore[no-any-return]
        except self.connection_errors:
            raise
        except Exception:  # INFO renamed or refused: no data-loss detection
            return None

    def data_lost(self, before: str | None, client: Any) -> bool:
        """Whether Redis may have lost data since run ``before`` (a restart, an old dump)."""
        return lost_since(before, self.run_id(client))

    def warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)


def lost_since(before: str | None, now: str | None) -> bool:
    return before is not None and now is not None and before != now
