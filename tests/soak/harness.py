"""The chaos soak: a job of mixed priorities and countdowns through every kind of fault.

Two prefork workers (``tests/bench/jobapp.py``, -c 2 each) consume one queue with
priority lists 0-9 through a reset proxy. Items get priority 0 (urgent), 5 or 9; some
have a countdown, a few one longer than the visibility timeout. Faults are applied in a
fixed order, each once the job has moved on since the last one, and logged:

- ``rst-fetch``: a reset after Redis has answered the N-th fetch (BRPOP for kombu);
- ``rst-write``: a reset before a task's state write reaches Redis;
- ``restart``: Redis restarts with its data (SHUTDOWN SAVE), down for a given time;
- ``term``: warm shutdown (SIGTERM) of one worker or of both, which start again. With both
  stopped, every message they held is back in Redis: each must sit in the list of its
  queue and priority (``misrouted`` counts those that do not);
- ``kill``: SIGKILL of one worker; its messages come back through the other worker (the
  plugin's orphan recovery; kombu's visibility-timeout sweep otherwise), then it starts.

:func:`run_soak` returns a :class:`SoakReport`; it asserts nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from celery_resilience import routing
from tests.bench.jobapp import PRIORITIES, failed, in_flight, progress, wait_until
from tests.bench.proxy import ResetProxy
from tests.bench.redis_server import RedisServer
from tests.bench.workers import PreforkWorker

REPO = str(Path(__file__).resolve().parents[2])
QUEUE = "celery"
SEP = "\x06\x16"
PRIORITY_MIX = (0, 5, 9)
VISIBILITY_TIMEOUT = 10  # short, so that kombu's sweep brings back a killed worker's messages
ORPHAN_TIMEOUT = 5  # the plugin's: a worker silent this long has its messages recovered


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str  # rst-fetch, rst-write, restart, term, kill
    arg: Any = None  # nth request, seconds down, or which worker ("a", "b", "both")


#: The faults, in order. Three restarts (one longer than 5 s), three warm shutdowns,
#: one SIGKILL, resets on a fetch and on a state write.
FAULTS = (
    Fault("rst-fetch", 40),
    Fault("restart", 1.0),
    Fault("term", "a"),
    Fault("rst-write", 25),
    Fault("restart", 6.0),
    Fault("term", "both"),
    Fault("kill", "b"),
    Fault("restart", 1.5),
    Fault("term", "both"),
)


@dataclasses.dataclass(frozen=True)
class SoakConfig:
    n: int = 600  # items
    work: float = 0.05  # seconds of work per item
    countdown_share: float = 0.1  # items with a countdown of 2-8 s
    long_countdowns: int = 5  # items with a countdown past the visibility timeout
    seed: int = 7
    faults: tuple[Fault, ...] = FAULTS
    settle: float = 120.0  # seconds to wait for the job to finish after the last fault


@dataclasses.dataclass
class SoakReport:
    plugin: bool
    n: int
    done: int = 0
    count: int = 0
    duplicates: int = 0
    failed: int = 0
    misrouted: int = 0
    crashes: int = 0
    left_unacked: int = 0
    left_in_flight: int = 0
    left_queued: int = 0
    seconds: float = 0.0
    log: list[str] = dataclasses.field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.n - self.done

    def summary(self) -> str:
        arm = "celery-resilience" if self.plugin else "plain Celery"
        return (
            f"{arm}: {self.done}/{self.n} done, lost {self.lost}, falsely failed {self.failed}, "
            f"misrouted {self.misrouted}, duplicates {self.duplicates} (count {self.count}), "
            f"worker crashes {self.crashes}, left unacked/in flight/queued "
            f"{self.left_unacked}/{self.left_in_flight}/{self.left_queued}, {self.seconds:.0f}s"
        )


def items(config: SoakConfig) -> list[tuple[int, int, float | None]]:
    """(item, priority, countdown) for every item, from the seed."""
    rng = random.Random(config.seed)
    out: list[tuple[int, int, float | None]] = []
    for n in range(config.n):
        countdown = rng.uniform(2, 8) if rng.random() < config.countdown_share else None
        out.append((n, rng.choice(PRIORITY_MIX), countdown))
    for n in rng.sample(range(config.n), config.long_countdowns):
        out[n] = (n, out[n][1], VISIBILITY_TIMEOUT + 5.0)
    return out


def run_soak(server: RedisServer, plugin: bool, config: SoakConfig = SoakConfig()) -> SoakReport:
    report = SoakReport(plugin, config.n)
    client = server.client()
    started = time.monotonic()
    _publish(server.url(), plugin, config)
    with ExitStack() as stack:
        proxy = stack.enter_context(ResetProxy(server.host, server.port))
        workers = {w: stack.enter_context(_worker(proxy.url(), plugin, w)) for w in ("a", "b")}
        chaos = _Chaos(server, proxy, workers, client, report, config)
        for fault in config.faults:
            chaos.wait_for_progress()
            chaos.apply(fault)
        chaos.settle()
    _read_back(report, client, config.n)
    report.seconds = time.monotonic() - started
    return report


def _publish(url: str, plugin: bool, config: SoakConfig) -> None:
    """The application's side. With the plugin it calls install(app) too, whose publish
    hook stamps each message's origin; the same stamp is written here directly, so that
    this test process keeps no process-wide hook."""
    app = Celery("soak-producer", broker=url, set_as_current=False)
    app.conf.broker_transport_options = dict(PRIORITIES)
    with app.producer_or_acquire() as producer:
        for n, priority, countdown in items(config):
            stamp = routing.Origin(QUEUE, "", QUEUE, priority).headers() if plugin else {}
            app.send_task("job.item", args=[n, config.work], priority=priority,
                          countdown=countdown, producer=producer, headers=stamp)  # fmt: skip


@contextmanager
def _worker(url: str, plugin: bool, name: str) -> Iterator[PreforkWorker]:
    env = {
        "JOB_BROKER_URL": url,
        "JOB_PLUGIN": "1" if plugin else "0",
        "JOB_PRIORITIES": "1",
        "JOB_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
        "JOB_ORPHAN_TIMEOUT": str(ORPHAN_TIMEOUT),
        "JOB_HEARTBEAT": "1",
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    worker = PreforkWorker("tests.bench.jobapp", concurrency=2, env=env, cwd=REPO,
                           hostname=f"soak-{name}-{os.getpid()}@%h")  # fmt: skip
    with worker:
        yield worker


class _Chaos:
    def __init__(self, server: RedisServer, proxy: ResetProxy, workers: dict[str, PreforkWorker],
                 client: redis.Redis, report: SoakReport, config: SoakConfig) -> None:  # fmt: skip
        self.server, self.proxy, self.workers = server, proxy, workers
        self.client, self.report, self.config = client, report, config
        self.started = time.monotonic()
        self._last_done = 0

    def note(self, what: str) -> None:
        line = f"{time.monotonic() - self.started:6.1f}s done={self._done():>5} {what}"
        self.report.log.append(line)

    def wait_for_progress(self) -> None:
        """Until the job has moved on by its share for one fault (or 20 s)."""
        step = max(1, self.config.n // (len(self.config.faults) + 3))
        target = min(self._last_done + step, self.config.n)
        wait_until(lambda: self._done() >= target, 20)
        self._revive()
        self._last_done = self._done()

    def apply(self, fault: Fault) -> None:
        self.note(f"fault {fault.kind} {fault.arg}")
        getattr(self, "_" + fault.kind.replace("-", "_"))(fault.arg)

    def _rst_fetch(self, nth: int) -> None:
        self.proxy.arm(rb"EVALSHA" if self.report.plugin else rb"BRPOP", nth=nth, when="after")
        self.note(f"  reset after a fetch: {self.proxy.wait_resets(self.proxy.resets + 1, 20)}")

    def _rst_write(self, nth: int) -> None:
        self.proxy.arm(rb"job:done", nth=nth, when="before")
        self.note(
            f"  reset before a state write: {self.proxy.wait_resets(self.proxy.resets + 1, 20)}"
        )

    def _restart(self, down: float) -> None:
        self.server.restart(down_for=down, save=True)

    def _term(self, which: str) -> None:
        names = list(self.workers) if which == "both" else [which]
        for name in names:
            self.workers[name].stop(signal.SIGTERM, timeout=60)
        if which == "both":  # everything the workers held is back in Redis now
            wrong = misplaced(self.client)
            self.report.misrouted += wrong
            self.note(f"  both stopped: {queued_count(self.client)} queued, {wrong} misplaced")
        for name in names:
            self.workers[name].start()

    def _kill(self, which: str) -> None:
        self.workers[which].kill()
        self.note(f"  worker {which} killed; the other one takes over its messages")
        time.sleep(ORPHAN_TIMEOUT + 2)  # the plugin's recovery; kombu's sweep needs longer
        self.workers[which].start()

    def settle(self) -> None:
        """Until the job is done and nothing is left anywhere, or it stops moving for
        twice kombu's visibility timeout plus a margin (what is lost stays lost)."""
        deadline = time.monotonic() + self.config.settle
        last, moved = self._done(), time.monotonic()
        while time.monotonic() < deadline and not _settled(self.client, self.config.n):
            self._revive()
            time.sleep(0.5)
            if self._done() != last:
                last, moved = self._done(), time.monotonic()
            elif time.monotonic() - moved > 2 * VISIBILITY_TIMEOUT + 10:
                break
        self.note("settled" if _settled(self.client, self.config.n) else "gave up waiting")

    def _revive(self) -> None:
        for name, worker in self.workers.items():
            if not worker.alive:
                self.report.crashes += 1
                self.note(f"  worker {name} had died (crash {self.report.crashes}); started again")
                worker.start()

    def _done(self) -> int:
        try:
            return int(self.client.scard("job:done"))
        except redis.ConnectionError:
            return self._last_done


def misplaced(client: redis.Redis) -> int:
    """Messages sitting in another list than their queue's list for their priority."""
    wrong = 0
    for step in range(10):
        key = QUEUE if step == 0 else f"{QUEUE}{SEP}{step}"
        for raw in client.lrange(key, 0, -1):
            priority = json.loads(raw)["properties"].get("priority") or 0
            wrong += int(min(max(int(priority), 0), 9) != step)
    return wrong


def queued_count(client: redis.Redis) -> int:
    return sum(int(client.llen(QUEUE if s == 0 else f"{QUEUE}{SEP}{s}")) for s in range(10))


def _settled(client: redis.Redis, n: int) -> bool:
    try:
        idle = queued_count(client) == 0 and client.hlen("unacked") == 0
        return bool(idle and in_flight(client) == 0 and client.scard("job:done") == n)
    except redis.ConnectionError:
        return False


def _read_back(report: SoakReport, client: redis.Redis, n: int) -> None:
    job = progress(client, n)
    report.done, report.count, report.duplicates = job["done"], job["count"], job["duplicates"]
    report.failed = failed(client)  # no item ever fails for a reason of its own
    report.left_unacked = int(client.hlen("unacked"))
    report.left_in_flight = in_flight(client)
    report.left_queued = queued_count(client)
