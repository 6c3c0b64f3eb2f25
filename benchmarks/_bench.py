"""Small helpers shared by the benchmarks: waiting, naming a worker, the run's environment."""

from __future__ import annotations

import math
import os
import socket
import sys
from collections.abc import Sequence
from typing import Callable

import redis

from tests.bench import jobapp
from tests.bench.workers import PreforkWorker


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """The test bench's wait (:func:`tests.bench.jobapp.wait_until`), raising naming ``what``."""
    if not jobapp.wait_until(predicate, timeout):
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def nodename(worker: PreforkWorker) -> str:
    """The worker's node name as Celery expands it (``%h``: this host's name).

    Remote-control calls must name their destination: a broadcast with ``reply=True``
    and no destination waits out its whole ``timeout`` for replies that never come.
    """
    return worker.hostname.replace("%h", socket.gethostname())


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def environment(client: redis.Redis) -> str:
    """One line: cores, Python, the library versions and ``client``'s redis-server."""
    import celery
    import kombu

    server = client.info("server")["redis_version"]
    return (f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, celery "
            f"{celery.__version__}, kombu {kombu.__version__}, redis-py {redis.__version__}, "
            f"redis-server {server}")  # fmt: skip
