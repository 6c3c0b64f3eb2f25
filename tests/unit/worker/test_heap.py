"""The freezer on this process's real collector: what it freezes, when it lets go."""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Iterator
from typing import Callable

import pytest

from celery_resilience import ConfigurationError, Settings
from celery_resilience.worker.heap import Freezer


class Node:
    """An object the collector tracks, with a reference cycle through ``self.me``."""

    def __init__(self) -> None:
        self.me = self


Make = Callable[..., Freezer]


def unfrozen() -> bool:
    """Nothing frozen but Python 3.12's own: its collections move immortal objects (a few
    hundred at start) to the permanent generation."""
    return gc.get_freeze_count() < 1_000


@pytest.fixture
def freezer() -> Iterator[Make]:
    gc.unfreeze()
    gc.disable()  # only the tests' own collections: an automatic one would freeze too
    made: list[Freezer] = []

    def make(threshold: float, **kwargs: float) -> Freezer:
        made.append(Freezer(threshold, **kwargs))
        return made[-1]

    yield make
    for f in made:
        f.remove()
    gc.unfreeze()
    gc.enable()


def test_a_slow_full_collection_freezes_its_survivors(freezer: Make) -> None:
    f = freezer(0.0)  # every full collection counts as slow
    f.install()
    backlog = [Node() for _ in range(10_000)]
    gc.collect(1)  # a young collection does not count
    assert (f.freezes, unfrozen()) == (0, True)
    gc.collect()
    assert f.freezes == 1
    assert gc.get_freeze_count() >= 10_000 and len(backlog) == 10_000  # alive, not walked
    f.check(pending=10_000)
    assert f.peak == 10_000 and gc.get_freeze_count() >= 10_000  # still held: stays frozen


class Request:
    def __init__(self, eta: object) -> None:
        self.eta = eta


def test_every_nth_eta_task_taken_in_freezes(freezer: Make) -> None:
    f = freezer(60.0, every=3)  # never slow enough: only arrivals freeze
    f.install()
    for _ in range(5):
        f.received(Request(eta=None))  # tasks without an ETA do not count
    assert (f.freezes, unfrozen()) == (0, True)
    f.received(Request(eta="2026-12-02T04:00:00"))
    f.received(Request(eta="2026-12-02T04:00:00"))
    assert f.freezes == 0
    f.received(Request(eta="2026-12-02T04:00:00"))
    assert f.freezes == 1 and gc.get_freeze_count() > 0


def test_arrivals_freeze_nothing_with_every_0(freezer: Make) -> None:
    f = freezer(60.0, every=0)
    for _ in range(10):
        f.received(Request(eta="2026-12-02T04:00:00"))
    assert (f.freezes, unfrozen()) == (0, True)


def test_a_fast_full_collection_freezes_nothing(freezer: Make) -> None:
    f = freezer(60.0)
    f.install()
    gc.collect()
    assert (f.freezes, unfrozen()) == (0, True)
    assert f.slowest > 0


def test_garbage_is_never_frozen(freezer: Make) -> None:
    f = freezer(0.0)
    f.install()
    garbage = [Node() for _ in range(5_000)]
    refs = [weakref.ref(n) for n in garbage]
    del garbage  # cycles: only a collection frees them
    assert gc.collect() >= 5_000
    assert f.freezes == 1
    # Frozen, they would be alive (and gc.get_objects() would not list them either).
    assert sum(1 for r in refs if r() is not None) == 0


def test_unfreezes_once_the_eta_backlog_is_down_to_half(
    freezer: Make, caplog: pytest.LogCaptureFixture
) -> None:
    f = freezer(0.0)
    f.install()
    gc.collect()
    gc.callbacks.remove(f)  # no new freeze while the backlog drains
    with caplog.at_level(logging.INFO, "celery_resilience"):
        f.check(pending=1000)
        f.check(pending=501)
        assert gc.get_freeze_count() > 0 and f.peak == 1000  # still mostly held
        f.check(pending=500)
    assert unfrozen() and f.peak == 0
    assert "objects frozen" in caplog.text
    assert "(500 of 1000 ETA tasks still held)" in caplog.text


def test_nothing_to_check_before_a_freeze(freezer: Make) -> None:
    f = freezer(60.0)
    f.check(pending=0)
    assert (f.peak, unfrozen()) == (0, True)


def test_unfreezes_after_max_frozen_seconds(freezer: Make) -> None:
    f = freezer(0.0, max_frozen=0.0)
    f.install()
    keep = [[n] for n in range(1_000)]
    gc.collect()
    assert gc.get_freeze_count() > 0
    gc.callbacks.remove(f)
    f.check(pending=len(keep))  # the backlog is all there, but it has been too long
    assert unfrozen() and keep


def test_remove_unfreezes_and_stops(freezer: Make) -> None:
    f = freezer(0.0)
    f.install()
    f.install()  # once only
    assert gc.callbacks.count(f) == 1
    gc.collect()
    f.remove()
    assert f not in gc.callbacks and unfrozen()
    gc.collect()
    assert unfrozen()


def test_another_process_inheriting_the_callback_freezes_nothing(freezer: Make) -> None:
    f = freezer(0.0)
    f.pid = -1  # as in a pool child: the callback list came with the fork
    f.install()
    gc.collect()
    assert (f.freezes, unfrozen()) == (0, True)


@pytest.mark.parametrize(("key", "value"), [("gc_freeze", "maybe"), ("gc_freeze_after", -1),
                                            ("gc_freeze_after", 11)])  # fmt: skip
def test_bad_gc_settings_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=f"resilience_{key}="):
        Settings.from_conf({f"resilience_{key}": value})
