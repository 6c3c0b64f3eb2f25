"""Short full garbage collections in a worker that holds a large backlog.

A worker holding thousands of ETA/countdown messages keeps a request, its message and a
timer entry for each in its main process. CPython's full (generation 2) collections walk
every tracked object: with 10 000 held, each takes 100-300 ms, and the consumer takes no
message meanwhile (benchmarks/RESULTS.md, "Urgent-task latency"). Celery needs those
objects; what can change is how often the collector walks them.

:class:`Freezer` moves what is alive to the permanent generation (:func:`gc.freeze`),
which collections skip, at two moments:

- every ``every`` ETA/countdown tasks the worker takes in (:meth:`Freezer.received`),
  after a young collection: a backlog is frozen while it arrives, so no full collection
  ever walks more than one batch of it;
- right after a full collection that took ``threshold`` seconds or more (a
  :data:`gc.callbacks` hook; any other kind of backlog): everything tracked then has just
  survived it, so nothing but live objects is frozen.

Frozen objects are still freed when their last reference goes, but garbage in reference
cycles among them stays until they are unfrozen, and a Celery request is such a cycle:
measured, 1 500 ETA tasks that had run left 97 % of what was frozen in place.
:meth:`Freezer.check` (every few seconds) therefore unfreezes once the worker's ETA
backlog is down to half its peak (it ran, or went back to the broker), or
``max_frozen`` seconds after the first freeze, and :meth:`Freezer.remove` when the
consumer stops; the next full collection frees them.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

logger = logging.getLogger(__name__)


class Freezer:
    """Freeze what is alive as a backlog arrives or a collection is slow; undo with remove()."""

    def __init__(self, threshold: float, every: int = 500, max_frozen: float = 600.0) -> None:
        self.threshold = threshold
        self.every = every
        self.max_frozen = max_frozen
        self._arrived = 0  # ETA tasks taken in since the last freeze
        self.pid = os.getpid()  # pool children inherit gc.callbacks: they stay out
        self.freezes = 0  # how many times this process froze
        self.peak = 0  # the most ETA tasks held since the first freeze
        self.slowest = 0.0  # the longest full collection seen, seconds
        self._started: float | None = None
        self._since: float | None = None  # monotonic time of the first freeze not undone
        self._reported = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside the collector: no logging, no allocation worth speaking of.
        if info.get("generation") != 2 or os.getpid() != self.pid:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:
            return
        took, self._started = time.perf_counter() - self._started, None
        self.slowest = max(self.slowest, took)
        if took >= self.threshold:
            self._freeze()

    def received(self, request: Any) -> None:
        """A task the worker took in (``task_received``): freeze every ``every`` ETA tasks.

        Per message, in the consumer (only the main process receives): no pid check.
        """
        if not self.every or getattr(request, "eta", None) is None:
            return
        self._arrived += 1
        if self._arrived >= self.every:
            gc.collect(1)  # the young garbage, not the old: a few ms at most
            self._freeze()

    def _freeze(self) -> None:
        gc.freeze()  # O(1): the generations' lists are spliced onto the permanent one
        self._arrived = 0
        self.freezes += 1
        if self._since is None:
            self._since = time.monotonic()

    def check(self, pending: int) -> None:
        """Every few seconds, with ``pending`` the worker's timer entries (its ETA tasks).

        Reports new freezes; unfreezes once the ETA backlog is down to half its peak (it
        ran, or went back to the broker), or ``max_frozen`` seconds after the first freeze.
        """
        if self._since is None:
            return
        self.peak = max(self.peak, pending)
        if self.freezes != self._reported:
            self._reported = self.freezes
            logger.info(
                "resilience: %d objects frozen, the collector need not walk them "
                "(%d freezes, %d ETA tasks held; full collections up to %.0f ms)",
                gc.get_freeze_count(), self.freezes, pending, self.slowest * 1000,
            )  # fmt: skip
        if pending * 2 <= self.peak or time.monotonic() - self._since >= self.max_frozen:
            self._unfreeze(f"{pending} of {self.peak} ETA tasks still held")

    def _unfreeze(self, why: str) -> None:
        left = gc.get_freeze_count()
        gc.unfreeze()
        logger.info("resilience: unfroze %d objects (%s)", left, why)
        self.peak, self._since = 0, None

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        """Stop freezing and unfreeze what this process froze (the consumer stopped)."""
        if self in gc.callbacks:
            gc.callbacks.remove(self)
        if self._since is not None and os.getpid() == self.pid:
            self._unfreeze("the consumer stopped: the ETA tasks it held are dropped")
