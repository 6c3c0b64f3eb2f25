"""The chaos soak (issue 5): resets, Redis restarts, warm and cold worker stops.

``test_chaos_soak`` is the short version CI runs (600 items); ``test_chaos_soak_5000``
is the on-demand one (``pytest -m slow tests/soak``; ``SOAK_N`` sets the size, ``SOAK_SEED``
the mix). Each runs with celery-resilience and, as the control, with plain Celery.
"""

from __future__ import annotations

import os

import pytest

from tests.bench.redis_server import RedisServer
from tests.soak.harness import SoakConfig, SoakReport, run_soak

pytestmark = pytest.mark.fault


def soak(plugin: bool, n: int, capsys: pytest.CaptureFixture[str]) -> SoakReport:
    config = SoakConfig(n=int(os.environ.get("SOAK_N", n)),
                        seed=int(os.environ.get("SOAK_SEED", 7)))  # fmt: skip
    with RedisServer() as server:
        report = run_soak(server, plugin, config)
    with capsys.disabled():
        print("\n  soak " + report.summary())
        for line in report.log:
            print("    " + line)
    return report


def check(report: SoakReport) -> None:
    if report.plugin:
        assert (report.lost, report.failed, report.misrouted, report.crashes) == (0, 0, 0, 0)
        assert report.count == report.n  # duplicates never change the job's totals
        assert (report.left_unacked, report.left_in_flight, report.left_queued) == (0, 0, 0)
    else:  # the control must show what the plugin prevents
        damage = report.lost + report.failed + report.misrouted + report.crashes
        assert damage >= 1, report.summary()


@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_chaos_soak(plugin: bool, capsys: pytest.CaptureFixture[str]) -> None:
    check(soak(plugin, 600, capsys))


@pytest.mark.slow
@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "control"])
def test_chaos_soak_5000(plugin: bool, capsys: pytest.CaptureFixture[str]) -> None:
    check(soak(plugin, 5000, capsys))
