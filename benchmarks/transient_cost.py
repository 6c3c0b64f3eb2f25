"""Wall time one connection reset adds to a job: ResilientTask vs a Celery retry.

The job is seed 001's pipeline (``examples/pipeline``): ``--images`` images, one task
each, run in order by an in-process solo worker; the job-state client talks to Redis
through a ResetProxy. One RST (before forwarding) hits the first state write of image
``--reset-at`` (default: the last image, so what the reset costs that image is what it
costs the job; earlier, other images may fill a Celery retry's countdown).

Two arms, each against the same job without the reset, in the same repeat:

- ``pipeline.process_image``: ResilientTask; tier 1 re-runs the body in-process;
- ``pipeline.process_image_autoretry``: a plain Task with the seed's ``autoretry_for``
  (backoff, full jitter): the retry is a new message through the broker.

Each repeat runs the four jobs (clean, reset) x (resilient, autoretry), the clean job
first in odd repeats and second in even ones. A job's time is from its first task's
start to its last task's finish (worker start and stop left out); the reset image's is
from its first start to its last finish. Prints what the reset added to each arm (median
over repeats; Celery's by the countdown its jitter drew) and, last, both medians (goal:
< 1 s added with ResilientTask).

    python benchmarks/transient_cost.py [--images 100] [--reset-at N] [--repeats 9]
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
JOB_LOGS = tempfile.mkdtemp(prefix="bench-jobs-")  # the pipeline's job logs, removed at exit
os.environ["PIPELINE_LOG_DIR"] = JOB_LOGS
atexit.register(shutil.rmtree, JOB_LOGS, True)

from celery import Celery  # noqa: E402
from celery.signals import before_task_publish, task_postrun, task_prerun  # noqa: E402

from benchmarks._bench import environment, wait_until  # noqa: E402
from examples.pipeline.app import create_app, submit_job  # noqa: E402
from tests.bench.proxy import ResetProxy  # noqa: E402
from tests.bench.redis_server import RedisServer  # noqa: E402
from tests.bench.workers import inprocess_worker  # noqa: E402

ARMS = {"ResilientTask": "", "Celery retry": "autoretry"}  # label -> pipeline variant
_job_ids = itertools.count(1)


class Timing(NamedTuple):
    job: float  # seconds from the job's first task start to its last task finish
    image: float  # seconds from the reset image's first start to its last finish


#: Countdowns of the retries published in this process (Celery's jittered backoff).
countdowns: list[float] = []
#: (job_id, image_id) -> [first start, last finish] of that image's task (all its runs).
spans: dict[tuple[int, int], list[float]] = {}


def _image(kwargs: dict[str, Any] | None) -> tuple[int, int]:
    return (kwargs or {}).get("job_id", 0), (kwargs or {}).get("image_id", 0)


@task_prerun.connect
def _started(kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    spans.setdefault(_image(kwargs), [time.perf_counter()])


@task_postrun.connect
def _finished(kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    spans[_image(kwargs)][1:] = [time.perf_counter()]


@before_task_publish.connect
def _note_retry_countdown(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if not (headers and headers.get("retries")):
        return
    if not headers.get("eta"):  # Celery sends no ETA when the jitter drew 0 s
        countdowns.append(0.0)
        return
    eta = datetime.fromisoformat(headers["eta"])
    now = datetime.now(eta.tzinfo or timezone.utc).replace(tzinfo=eta.tzinfo)
    countdowns.append(round((eta - now).total_seconds(), 1))


def run_job(app: Celery, proxy: ResetProxy, variant: str, n: int, reset_at: int) -> Timing:
    """One job's seconds: its first task start to its last task finish, and the same for
    image ``reset_at`` alone (``reset_at=0``: no reset; the image is then the last one)."""
    job_id = next(_job_ids)
    submit_job(app, job_id, n, variant)
    state = app.job_state(job_id)
    resets = proxy.resets
    if reset_at:
        proxy.arm(rb"pending:process", nth=reset_at, when="before")
    else:
        proxy.disarm()
    with inprocess_worker(app, pool="solo"):
        wait_until(lambda: state.status() != "STARTED", f"job {job_id}")
    if state.status() != "SUCCESS" or proxy.resets != resets + bool(reset_at):
        raise RuntimeError(f"job {job_id} ({variant or 'resilient'}): {state.status()}, "
                           f"{proxy.resets - resets} resets")  # fmt: skip
    job = [spans.pop((job_id, image)) for image in range(1, n + 1)]
    first, last = job[(reset_at or n) - 1]
    return Timing(max(s[-1] for s in job) - min(s[0] for s in job), last - first)


def one_repeat(
    app: Celery, proxy: ResetProxy, n: int, reset_at: int, reset_first: bool
) -> dict[str, Timing]:
    """Seconds the reset added to each arm's job and image, against the arm's clean job.

    ``reset_first`` swaps the order of the two jobs (alternated, so order effects cancel).
    """
    added = {}
    for label, variant in ARMS.items():
        runs = {at: run_job(app, proxy, variant, n, at)
                for at in ((reset_at, 0) if reset_first else (0, reset_at))}  # fmt: skip
        clean, reset = runs[0], runs[reset_at]
        added[label] = Timing(reset.job - clean.job, reset.image - clean.image)
        print(f"  {label:<14} job: clean {clean.job:6.3f}s  reset {reset.job:6.3f}s  "
              f"added {added[label].job:+6.3f}s | image added {added[label].image:+6.3f}s",
              flush=True)  # fmt: skip
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--reset-at", type=int, default=0, help="default: the last image")
    parser.add_argument("--repeats", type=int, default=9)
    opts = parser.parse_args()
    reset_at = opts.reset_at or opts.images
    added: dict[str, list[Timing]] = {label: [] for label in ARMS}
    with RedisServer() as server, ResetProxy(server.host, server.port) as proxy:
        print(environment(server.client()))
        print(f"{opts.images} images, one RST before image {reset_at}'s first state write")
        app = create_app(server.url(0), proxy.url(0))
        run_job(app, proxy, "", 20, 0)  # warm-up: imports, connections, script cache
        for r in range(opts.repeats):
            print(f"repeat {r + 1}/{opts.repeats}", flush=True)
            repeat = one_repeat(app, proxy, opts.images, reset_at, reset_first=r % 2 == 1)
            for label, timing in repeat.items():
                added[label].append(timing)
    report(added, opts.repeats)


def report(added: dict[str, list[Timing]], repeats: int) -> None:
    for label, timings in added.items():
        print(f"{label:<14}: image added median {median(timings, 'image'):+.3f}s; job added "
              f"median {median(timings, 'job'):+.3f}s, mean {mean(timings, 'job'):+.3f}s")  # fmt: skip
    # One retry per reset job: the countdown Celery drew decides what the reset cost.
    if len(countdowns) == repeats:
        by_draw: dict[float, list[Timing]] = {}
        for countdown, timing in zip(countdowns, added["Celery retry"]):
            by_draw.setdefault(countdown, []).append(timing)
        print("Celery retry by drawn countdown: " + ", ".join(
            f"{c:.0f}s -> image {median(t, 'image'):+.3f}s, job {median(t, 'job'):+.3f}s "
            f"({len(t)}x)" for c, t in sorted(by_draw.items())
        ))  # fmt: skip
    (res_job, retry_job), (res_image, retry_image) = (
        [median(added[label], field) for label in ARMS] for field in ("job", "image")
    )
    print(f"one reset adds (median of {repeats}): ResilientTask {res_job:+.3f}s to the job "
          f"({res_image:+.3f}s to its image), Celery retry {retry_job:+.3f}s "
          f"({retry_image:+.3f}s)")  # fmt: skip


def median(timings: list[Timing], field: str) -> float:
    return float(statistics.median(getattr(t, field) for t in timings))


def mean(timings: list[Timing], field: str) -> float:
    return float(statistics.mean(getattr(t, field) for t in timings))


if __name__ == "__main__":
    main()
