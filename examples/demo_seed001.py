"""Seed 001 in the demo: the image pipeline through a TCP reset and a Redis restart.

1. 840 images; the job-state connection is reset (TCP RST) before the 507th state read.
   The incident's naive task vs ResilientTask (examples/pipeline/scenarios.run_inprocess).
2. 200 images on a prefork worker; the redis-server holding broker *and* job state is
   down for 3.5 s mid-job. Plain Celery ``autoretry_for`` vs ResilientTask
   (examples/pipeline/scenarios.run_through_restart).
"""

from __future__ import annotations

import os
from typing import Callable

from tests.bench.proxy import ResetProxy
from tests.bench.redis_server import RedisServer

from .demo_ui import Line, Row
from .pipeline import scenarios
from .pipeline.app import create_app, submit_job

IMAGES = 840
RESET_AT = 507
RESTART_IMAGES = 200  # run_through_restart's default
SCENARIOS = 4
Progress = Callable[[int, int], None]


def own_log_dir(root: str, name: str) -> str:
    """Each run writes its job log into a folder of its own."""
    path = os.path.join(root, name)
    os.environ["PIPELINE_LOG_DIR"] = path
    return path


def reset_scenario(server: RedisServer, variant: str, progress: Progress) -> scenarios.Outcome:
    server.client().flushall()
    with ResetProxy(server.host, server.port) as proxy:
        app = create_app(server.url(0), proxy.url(0))
        submit_job(app, 1, IMAGES, variant)
        proxy.arm(rb"pending:process", nth=RESET_AT, when="before")
        return scenarios.run_inprocess(app, IMAGES, progress=progress)


def restart_scenario(variant: str, log_root: str, progress: Progress) -> scenarios.Outcome:
    log_dir = own_log_dir(log_root, f"restart-{variant or 'resilient'}")
    with RedisServer() as server:
        return scenarios.run_through_restart(server, variant, log_dir=log_dir, progress=progress)


def job(outcome: scenarios.Outcome, total: int) -> str:
    return f"{outcome.status} {outcome.done}/{total}"


def done_lost(outcome: scenarios.Outcome, total: int) -> str:
    alive = "" if outcome.worker_alive else ", worker dead"
    return f"{outcome.done}/{total}, {outcome.lost} lost{alive}"


def cause(outcome: scenarios.Outcome) -> str:
    return "named in the job log" if outcome.transient_lines else "not in the job log"


def run(line: Line, log_root: str) -> tuple[list[Row], list[str]]:
    """Both scenarios, plain Celery first; the table rows and notes."""
    with RedisServer() as server:
        own_log_dir(log_root, "reset-naive")
        naive = reset_scenario(server, "naive", line.stage("reset: plain (naive task)"))
        own_log_dir(log_root, "reset-resilient")
        resilient = reset_scenario(server, "", line.stage("reset: celery-resilience"))
    autoretry = restart_scenario(
        "autoretry", log_root, line.stage("restart: plain (autoretry_for)")
    )
    survived = restart_scenario("", log_root, line.stage("restart: celery-resilience"))
    line.done()
    rows = [
        Row("001", f"{IMAGES} images, TCP RST at read {RESET_AT}", "job, images done",
            job(naive, IMAGES), job(resilient, IMAGES)),
        Row("001", f"{RESTART_IMAGES} images, Redis down 3.5 s", "images done, lost",
            done_lost(autoretry, RESTART_IMAGES), done_lost(survived, RESTART_IMAGES)),
    ]  # fmt: skip
    notes = [
        f"001 reset: the cause is {cause(naive)} (plain), {cause(resilient)} (resilience): "
        + (resilient.transient_lines or ["-"])[0][9:],
        f"001 times: reset {naive.seconds:.1f}s vs {resilient.seconds:.1f}s, restart "
        f"{autoretry.seconds:.1f}s vs {survived.seconds:.1f}s (plain vs resilience)",
    ]
    return rows, notes
