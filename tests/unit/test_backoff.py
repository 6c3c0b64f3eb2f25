"""The backoff vocabulary: exponential, capped, full jitter, sub-second bases."""

from __future__ import annotations

from celery_resilience import backoff


def test_exponential_without_jitter() -> None:
    waits = [backoff(0.1, n, cap=2.0, jitter=False) for n in range(1, 8)]
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


def test_full_jitter_spans_zero_to_ceiling() -> None:
    assert backoff(1.0, 3, cap=30, rng=lambda: 0.0) == 0.0
    assert backoff(1.0, 3, cap=30, rng=lambda: 0.5) == 2.0
    assert backoff(1.0, 3, cap=30, rng=lambda: 0.999) == 3.996


def test_huge_attempt_is_capped_not_overflowing() -> None:
    assert backoff(1.0, 10_000, cap=30, jitter=False) == 30
