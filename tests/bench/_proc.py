"""Process plumbing shared by the bench: spawning, death signals, group census, registry.

Every child the bench starts gets ``PR_SET_PDEATHSIG=SIGKILL`` so it dies with the test
session even when pytest itself is killed.  The kernel ties that signal to the *thread*
that forked the child, not to the process: a server (re)started from a short-lived helper
thread (``threading.Timer(1, server.restart)``) would be SIGKILLed the moment that thread
ends.  So children are always forked from a thread that lives as long as the process: the
main thread, or a dedicated spawner thread when called from anywhere else.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Protocol, TypeVar

_PR_SET_PDEATHSIG = 1


class Closable(Protocol):
    """Anything the bench can shut down at session end: stop it and free its files."""

    def close(self) -> Any: ...


_Started = TypeVar("_Started", bound="StartClose")


class StartClose:
    """``with thing:`` starts it (``start()`` returns self) and closes it on the way out."""

    def start(self: _Started) -> _Started:
        raise NotImplementedError

    def close(self) -> Any:
        raise NotImplementedError

    def __enter__(self: _Started) -> _Started:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _load_prctl() -> Callable[..., int] | None:
    """Resolve libc's prctl once, in the parent: the child must not import or dlopen."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGKILL this child when its parent thread dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class _Spawner:
    """A long-lived daemon thread that forks children on behalf of other threads."""

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], Any]) -> Any:
        self._ensure_thread()
        future: Future[Any] = Future()
        self._requests.put((fn, future))
        return future.result()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="bench-spawner", daemon=True
                )
                self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, future = self._requests.get()
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed back to the caller, not swallowed
                future.set_exception(exc)


_SPAWNER = _Spawner()


def spawn(argv: list[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """Popen ``argv`` in its own session with PDEATHSIG=SIGKILL, from a long-lived thread."""
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    # Own session/process group: Ctrl-C in the terminal must not reach the children
    # (the bench decides how they stop) and a whole worker tree can be killed by group.
    popen_kwargs["start_new_session"] = True
    if _PRCTL is not None:
        popen_kwargs["preexec_fn"] = _die_with_parent

    def _popen() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, **popen_kwargs)

    if threading.current_thread() is threading.main_thread():
        return _popen()
    return _SPAWNER.run(_popen)  # type: ignore[no-any-return]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group ``pgid``.

    Orphans are reparented to PID 1, which may never reap them in a container, so
    ``killpg(pgid, 0)`` would keep succeeding for zombies; /proc tells them apart.
    """
    if not os.path.isdir("/proc/self"):
        return _group_members_portable(pgid)
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _proc_pgrp_if_alive(int(entry)) == pgid:
            members.append(int(entry))
    return members


def _proc_pgrp_if_alive(pid: int) -> int | None:
    """Process group of ``pid`` from /proc/PID/stat, or None when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name is parenthesised and may contain spaces: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[2])


def _group_members_portable(pgid: int) -> list[int]:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return []
    return [pgid]


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    if os.path.isdir("/proc/self"):
        return _proc_pgrp_if_alive(pid) is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_group(pgid: int, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process in ``pgid`` and wait until none is left; returns survivors."""
    deadline = time.monotonic() + timeout
    while True:
        members = group_members(pgid)
        if not members or time.monotonic() > deadline:
            return members
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return []
        time.sleep(0.01)


def wait_group_empty(pgid: int, timeout: float) -> bool:
    """Poll until process group ``pgid`` has no live member; False on timeout."""
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- registry: everything the bench started, so a session hook can stop it all -------------

_LIVE: dict[int, Closable] = {}
_LIVE_LOCK = threading.Lock()


def register(obj: Closable) -> None:
    with _LIVE_LOCK:
        _LIVE[id(obj)] = obj


def unregister(obj: Closable) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(id(obj), None)


def live_objects() -> list[Closable]:
    with _LIVE_LOCK:
        return list(_LIVE.values())


def stop_all() -> list[str]:
    """Stop everything still registered; returns a description of what had leaked."""
    leaked = []
    for obj in reversed(live_objects()):
        leaked.append(repr(obj))
        try:
            obj.close()
        except Exception:  # one broken object must not keep the others running
            pass
        unregister(obj)
    return leaked


def _stop_all_at_exit() -> None:
    stop_all()


atexit.register(_stop_all_at_exit)


def tail(text: str, lines: int = 30) -> str:
    """The last ``lines`` lines of ``text``, for error messages."""
    return "\n".join(text.splitlines()[-lines:])
