"""Seed 002 in the demo: where urgent tasks run after a worker handed back its ETA backlog.

examples/priorities/scenario.run: a prefork worker reserves 20 low (priority 9) and 5
medium (priority 3) countdown tasks and gets SIGTERM; 5 urgent tasks (priority 0) are
published; once the countdowns are due a fresh worker runs all 30. Reported: the positions
at which the urgent tasks ran, and which kombu produced the figure. kombu <= 5.3 put every
restored task in the list polled first (the urgent tasks ran at 25-29); kombu >= 5.4 keeps
the priority, so there plain Celery gets 0-4 as well.
"""

from __future__ import annotations

import kombu

from tests.bench.redis_server import RedisServer

from .demo_ui import Line, Probe, Row
from .priorities.app import LOW, MEDIUM, RAN, URGENT, priority_key
from .priorities.scenario import Outcome
from .priorities.scenario import run as run_scenario

SCENARIOS = 2
HELD, TOTAL = 25, 30


def probe(server: RedisServer) -> Probe:
    """What the scenario is at, read from Redis on every redraw of the progress line."""
    client = server.client()

    def note() -> str:
        ran, held = client.llen(RAN), client.hlen("unacked")
        if ran:
            return f"{ran}/{TOTAL} tasks ran"
        if held:
            return f"the worker holds {held}/{HELD} countdown tasks"
        queued = sum(client.llen(priority_key("high", p)) for p in (URGENT, MEDIUM, LOW))
        if queued:
            return f"{queued} tasks back in the queue, waiting for the countdowns"
        return f"a worker reserves {HELD} countdown tasks"

    return note


def positions(outcome: Outcome) -> str:
    """``0-4`` for a run of positions, else the list."""
    ran = outcome.urgent_positions
    if ran and ran == list(range(ran[0], ran[-1] + 1)):
        return f"{ran[0]}-{ran[-1]}"
    return ", ".join(map(str, ran)) or "none"


def lists(outcome: Outcome) -> str:
    return ", ".join(f"{key} {n}" for key, n in outcome.lists.items() if n)


def run(line: Line) -> tuple[list[Row], list[str]]:
    """Plain Celery, then celery-resilience, on one redis-server; the table rows and notes."""
    # install() elsewhere in this process (seed 001, the second run) stamps the plain run's
    # messages too (a process-wide publish hook); the stamp is inert without the plugin's
    # guard in the worker, and the plain worker has none: it restores as kombu does.
    with RedisServer() as server:
        line.stage("restore: plain", probe(server))
        plain = run_scenario(server, plugin=False)
        server.client().flushall()  # as run() does: the probe must not see the last run
        line.stage("restore: celery-resilience", probe(server))
        resilient = run_scenario(server, plugin=True)
    line.done()
    row = Row("002", f"kombu {kombu.__version__}: {HELD} ETA tasks back",
              f"urgent ran at (of {TOTAL})", positions(plain), positions(resilient))  # fmt: skip
    fixed = kombu.VERSION >= (5, 4)
    notes = [
        f"002 on kombu {kombu.__version__}: the handed-back tasks went to {lists(plain)} (plain), "
        f"{lists(resilient)} (resilience). "
        + ("kombu >= 5.4 keeps the priority on a restore by itself; the seed-002 bug (urgent "
           "tasks at 25-29, all 25 in the bare 'high' list) shows on kombu <= 5.3."
           if fixed else "This is the seed-002 bug: kombu <= 5.3 ignores the priority.")
    ]  # fmt: skip
    return [row], notes
