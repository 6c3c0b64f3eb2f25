"""Celery workers for tests: in-process (fast) and real ``celery worker`` subprocesses.

In-process workers (``celery.contrib.testing.worker.start_worker``) are right for most
tests; bootstep, fork, shutdown and restore behaviour needs a real prefork worker, which
:class:`PreforkWorker` runs as a subprocess (ready ~0.6 s, warm shutdown ~2.5 s).
"""

from __future__ import annotations

import gc
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from . import _proc

if TYPE_CHECKING:
    from celery import Celery
    from celery.worker import WorkController

_READY = re.compile(r"\bready\.")
_counter = itertools.count(1)


@contextmanager
def inprocess_worker(
    app: Celery,
    *,
    pool: str = "solo",
    concurrency: int = 1,
    queues: Sequence[str] | None = None,
    loglevel: str = "WARNING",
    shutdown_timeout: float = 10.0,
    **kwargs: Any,
) -> Iterator[WorkController]:
    """Run a worker for ``app`` in a thread of this process for the ``with`` block.

    Works around the pitfalls measured here:

    * no ping check, so ``celery.ping`` need not be registered on ``app``;
    * kombu's global event loop is reset before and after: on celery 5.3 a second
      in-process worker otherwise reuses the dead hub and never runs ETA tasks;
    * automatic GC is off while the worker lives: a collection running mid-request can
      deadlock celery 5.4/5.6 with redis-py 5.3 (celery#10477);
    * the app's queue selection is restored afterwards: ``queues=`` makes the worker call
      ``app.amqp.queues.select()``, which sticks to the app, and a later worker without
      ``queues`` would silently consume only those queues.

    A task still running after ``shutdown_timeout`` makes ``start_worker`` raise on exit.
    """
    from celery.contrib.testing.worker import start_worker

    if queues is not None:
        kwargs["queues"] = list(queues)
    # Callers (e.g. celery_worker_parameters) may still ask for the ping check explicitly.
    kwargs.setdefault("perform_ping_check", False)
    gc_was_enabled = gc.isenabled()
    _reset_event_loop()
    gc.disable()
    try:
        with (
            _queue_selection_restored(app),
            start_worker(
                app,
                pool=pool,
                concurrency=concurrency,
                loglevel=loglevel,
                shutdown_timeout=shutdown_timeout,
                **kwargs,
            ) as worker,
        ):
            yield worker
    finally:
        _reset_event_loop()
        if gc_was_enabled:
            gc.enable()


@contextmanager
def _queue_selection_restored(app: Celery) -> Iterator[None]:
    # Private attributes that select()/deselect() mutate: `_consume_from` (all versions) and
    # `_default_consume_from` (celery >= 5.5 only).
    queues = app.amqp.queues
    saved = {
        name: None if value is None else dict(value)
        for name, value in vars(queues).items()
        if name in ("_consume_from", "_default_consume_from")
    }
    try:
        yield
    finally:
        queues._consume_from = None  # back to the class default unless saved below
        for name, value in saved.items():
            setattr(queues, name, value)


def _reset_event_loop() -> None:
    from kombu.asynchronous import set_event_loop

    set_event_loop(None)


class PreforkWorker(_proc.StartClose):
    """A real ``celery -A app worker`` subprocess in its own process group.

    Output goes to a log file (``log`` property).  The main process gets
    PR_SET_PDEATHSIG=SIGKILL; its pool children are swept by process group on stop/kill,
    so nothing survives ``stop()``, ``kill()`` or the end of a ``with`` block.
    """

    def __init__(
        self,
        app: str,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        loglevel: str = "INFO",
        extra_args: Sequence[str] = (),
        hostname: str | None = None,
    ) -> None:
        if loglevel.upper() not in ("DEBUG", "INFO"):
            # start() waits for the "<node> ready." line, which is logged at INFO.
            raise ValueError("PreforkWorker needs loglevel INFO or DEBUG to detect readiness")
        self.app = app
        self.pool = pool
        self.concurrency = concurrency
        self.queues = list(queues) if queues else None
        self.env = dict(env or {})
        self.cwd = cwd
        self.loglevel = loglevel
        self.extra_args = tuple(extra_args)
        self.hostname = hostname or _unique_hostname()
        self.dir = tempfile.mkdtemp(prefix="bench-worker-")
        self.log_path = os.path.join(self.dir, "worker.log")
        self.returncode: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        _proc.register(self)

    @property
    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "celery", "-A", self.app, "worker"]
        argv += ["-P", self.pool, "-c", str(self.concurrency)]
        argv += ["--without-mingle", "--without-gossip"]
        argv += ["-n", self.hostname, "-l", self.loglevel]
        if self.queues:
            argv += ["-Q", ",".join(self.queues)]
        return argv + list(self.extra_args)

    def start(self, timeout: float = 30.0) -> PreforkWorker:
        """Spawn the worker and wait for its ``ready.`` line; raise with the log tail if not."""
        if self.alive:
            return self
        self._log_offset = _file_size(self.log_path)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        with open(self.log_path, "ab") as log:
            self._proc = _proc.spawn(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd
            )
        self.returncode = None
        try:
            self.wait_for_log(_READY, timeout)
        except RuntimeError:
            self._kill_all()
            raise
        return self

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> str:
        """Wait until this run's log matches ``pattern``; returns the matching line."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self._read_log(self._log_offset)
            found = regex.search(text)
            if found:
                return _line_at(text, found.start())
            if not self.alive:
                raise RuntimeError(
                    self._failure(f"exited (rc={self.returncode}) before {regex.pattern!r}")
                )
            if time.monotonic() > deadline:
                raise RuntimeError(self._failure(f"no {regex.pattern!r} within {timeout}s"))
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the main process (TERM = warm, QUIT = cold shutdown) and wait for it.

        After ``timeout`` the worker is asked for its thread stacks (SIGUSR1: Celery's
        ``cry`` handler writes them to the log, so a hung shutdown shows where it hung) and
        the whole group is SIGKILLed; leftover children are swept either way.  Returns the
        main process's exit code.  Idempotent.
        """
        proc = self._proc
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._dump_stacks(proc)
                _proc.kill_group(proc.pid)
                proc.wait()
        # A warm shutdown has already reaped the pool; after a cold one or a timeout the
        # children may still be exiting: give them a moment, then SIGKILL the rest.
        if not _proc.wait_group_empty(proc.pid, 5.0):
            _proc.kill_group(proc.pid)
        return self._forget(proc)

    @staticmethod
    def _dump_stacks(proc: subprocess.Popen[bytes], wait: float = 2.0) -> None:
        try:
            proc.send_signal(signal.SIGUSR1)
            proc.wait(wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass

    def kill(self) -> int | None:
        """SIGKILL the main process only (a crash), then sweep its orphans by group."""
        proc = self._proc
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _proc.kill_group(proc.pid)
        return self._forget(proc)

    def _kill_all(self) -> None:
        proc = self._proc
        if proc is not None:
            _proc.kill_group(proc.pid)
            proc.wait()
            self._forget(proc)

    def _forget(self, proc: subprocess.Popen[bytes]) -> int | None:
        self.returncode = proc.returncode
        self._proc = None
        return self.returncode

    def close(self) -> None:
        """Stop (a cold SIGKILL sweep if the warm stop fails) and delete the log dir."""
        try:
            self.stop(timeout=15.0)
        finally:
            self._kill_all()
            shutil.rmtree(self.dir, ignore_errors=True)
            _proc.unregister(self)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def group_pids(self) -> list[int]:
        """Live processes of this worker's process group (main process and pool children)."""
        return _proc.group_members(self.pid) if self.pid is not None else []

    @property
    def log(self) -> str:
        """Everything the worker wrote so far (all runs)."""
        return self._read_log(0)

    def _read_log(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _failure(self, what: str) -> str:
        return f"celery worker {self.hostname} {what}; log tail:\n{_proc.tail(self.log, 40)}"

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.alive else f"rc={self.returncode}"
        return f"<PreforkWorker {self.app} {self.hostname} {state}>"


def _unique_hostname() -> str:
    return f"bench-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:6]}@%h"


def _line_at(text: str, index: int) -> str:
    start = text.rfind("\n", 0, index) + 1
    end = text.find("\n", index)
    return text[start : end if end >= 0 else len(text)]


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0
