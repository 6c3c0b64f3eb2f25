"""What the demo shows while it works and when it is done: progress lines and the table.

A :class:`Board` holds one :class:`Line` per seed. The seeds run at the same time (they
mostly wait: for a countdown, an idle firewall, a visibility timeout), each in its own
thread, and each moves its own line. On a terminal the lines are redrawn in place a few
times a second; elsewhere (a pipe, a CI log) a line is printed when a scenario starts,
at every quarter of a counted one, and when a seed is done.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import threading
import time
from typing import Callable, TextIO

Probe = Callable[[], str]
WIDTH = 20  # of the bar


class Cancelled(Exception):
    """The demo was interrupted: no seed starts another scenario."""


class Line:
    """One seed's progress: which of its scenarios runs, how far along, for how long."""

    def __init__(self, name: str, scenarios: int, board: Board) -> None:
        self.name, self.scenarios, self.board = name, scenarios, board
        self.started = time.monotonic()
        self.index, self.fraction, self.text, self.note = 0, 0.0, "waiting", ""
        self.probe: Probe | None = None
        self.ended: float | None = None

    def stage(self, text: str, probe: Probe | None = None) -> Callable[[int, int], None]:
        """The next scenario starts; returns its ``progress(done, total)`` callback.

        ``probe`` (optional) is asked for a note on every redraw, e.g. counts read from Redis.
        """
        if self.board.cancelled.is_set():
            raise Cancelled(self.name)
        self.index += 1
        self.text, self.note, self.fraction, self.probe = text, "", 0.0, probe
        self.board.changed(self, force=True)
        return self.count

    def count(self, done: int, total: int) -> None:
        quarter = int(4 * self.fraction)
        self.fraction = min(done / max(total, 1), 1.0)
        self.note = f"{done}/{total}"
        self.board.changed(self, force=int(4 * self.fraction) != quarter)

    def say(self, note: str) -> None:
        """What the current scenario is doing now (starting a worker, idling ...)."""
        self.note = note
        self.board.changed(self, force=True)

    def done(self, text: str = "done") -> None:
        self.index, self.fraction, self.text, self.note, self.probe = (
            self.scenarios, 0.0, text, "", None
        )  # fmt: skip
        self.ended = time.monotonic()
        self.board.changed(self, force=True)

    def render(self, columns: int = 110, *, probe: bool = True) -> str:
        """The line, cut to ``columns``; the seconds stay at its end."""
        if probe and self.probe is not None:
            try:
                self.note = self.probe()
            except Exception:  # the probe's Redis may be restarting: keep the last note
                pass
        finished = max(self.index - 1, 0) + self.fraction if self.ended is None else self.index
        filled = int(WIDTH * finished / self.scenarios)
        seconds = (self.ended or time.monotonic()) - self.started
        step = f"{min(max(self.index, 1), self.scenarios)}/{self.scenarios}"
        head = f"  {self.name:<8} [{'#' * filled}{'.' * (WIDTH - filled)}] {step} "
        what = f"{self.text}: {self.note}" if self.note else self.text
        room = max(columns - len(head) - 6, 10)
        what = what if len(what) <= room else what[: room - 3] + "..."
        return f"{head}{what:<{room}}{seconds:5.0f}s"


class Board:
    """The progress lines of every seed, redrawn in place on a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.lines: list[Line] = []
        self._lock = threading.Lock()
        self._drawn = 0
        self._stop = threading.Event()
        self.cancelled = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="demo-board", daemon=True)

    def line(self, name: str, scenarios: int) -> Line:
        line = Line(name, scenarios, self)
        self.lines.append(line)
        return line

    def changed(self, line: Line, *, force: bool) -> None:
        """A terminal redraws on its own tick; elsewhere print the line when it matters
        (without the probe's note: it changes too often for a log)."""
        if not self.tty and force:
            self._write(line.render(probe=False).rstrip() + "\n")

    def __enter__(self) -> Board:
        if self.tty:
            self._ticker.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self.tty:
            self._ticker.join()
            self._redraw()

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            self._redraw()

    def _redraw(self) -> None:
        columns = min(shutil.get_terminal_size().columns - 1, 110)  # never wrap: cursor math
        text = "".join(f"\r\x1b[2K{line.render(columns)}\n" for line in self.lines)
        up = f"\x1b[{self._drawn}A" if self._drawn else ""
        self._write(up + text)
        self._drawn = len(self.lines)

    def _write(self, text: str) -> None:
        with self._lock:
            self.stream.write(text)
            self.stream.flush()


@dataclasses.dataclass
class Row:
    """One scenario of the final table: what was measured, plain Celery vs the plugin."""

    seed: str
    scenario: str
    measure: str
    plain: str
    resilient: str


HEADER = Row("seed", "scenario", "measure", "plain Celery", "celery-resilience")


def table(rows: list[Row]) -> str:
    """The rows side by side, columns as wide as their widest cell."""
    every = [HEADER, *rows]
    widths = [max(len(getattr(r, f.name)) for r in every) for f in dataclasses.fields(Row)]

    def line(row: Row) -> str:
        cells = [getattr(row, f.name) for f in dataclasses.fields(Row)]
        return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "  " + "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([line(HEADER), rule, *map(line, rows)])
