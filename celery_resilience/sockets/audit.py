"""Which Redis sockets a process has, and the keepalive options the kernel gives them.

:func:`sweep` applies options to connections opened before the hook (at import time);
:func:`audit` reads this process's sockets back; :func:`audit_process` another process's
(a prefork child), through ``pidfd_getfd``.
"""

from __future__ import annotations

import errno
import gc
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

from .hooks import async_socket
from .options import KeepaliveOptions, apply, read_options


def _open_sockets() -> Iterator[tuple[Any, Any]]:
    """(connection object, socket) for every open redis-py TCP connection in this process."""
    import redis.connection

    sync_types: tuple[type, ...] = (redis.connection.Connection,)
    async_types: tuple[type, ...] = ()
    if "redis.asyncio.connection" in sys.modules:
        async_types = (sys.modules["redis.asyncio.connection"].Connection,)
    for obj in gc.get_objects():
        if isinstance(obj, sync_types):
            sock = getattr(obj, "_sock", None)
        elif async_types and isinstance(obj, async_types):
            sock = async_socket(obj)
        else:
            continue
        if sock is not None and getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            yield obj, sock


def sweep(options: KeepaliveOptions) -> tuple[int, int]:
    """Apply ``options`` to every open redis-py TCP connection; (applied, found)."""
    found = applied = 0
    for _, sock in _open_sockets():
        found += 1
        applied += apply(sock, options)
    return applied, found


def _describe(sock: Any) -> dict[str, Any]:
    try:
        local, peer = sock.getsockname(), sock.getpeername()
    except OSError:
        return {}
    return {"fd": sock.fileno(), "local": f"{local[0]}:{local[1]}", "peer": f"{peer[0]}:{peer[1]}"}


def audit() -> list[dict[str, Any]]:
    """This process's open Redis TCP sockets with their effective keepalive options.

    Each entry: ``pid``, ``fd``, ``local``, ``peer``, ``owner`` (the redis-py class),
    ``keepalive`` (0/1), ``idle``, ``interval``, ``count`` and ``user_timeout`` (seconds),
    as read back from the kernel.
    """
    entries = []
    for conn, sock in _open_sockets():
        where = _describe(sock)
        if where:
            entries.append({"pid": os.getpid(), **where, "owner": type(conn).__name__,
                            **read_options(sock)})  # fmt: skip
    return entries


# -- another process's sockets (Linux: pidfd_getfd) ----------------------------------------

_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (generic table)


def audit_process(pid: int, peers: set[str] | None = None) -> list[dict[str, Any]]:
    """Established TCP sockets of process ``pid`` with their options, read from the kernel.

    ``peers``: keep only sockets whose peer is one of these ``"host:port"`` strings (or
    whose peer port is, given as ``":port"``). Needs Linux >= 5.6 and ptrace rights over
    ``pid`` (same user, or root); returns [] where that is not possible.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return []
    try:
        return [e for e in _remote_sockets(pid, pidfd) if _wanted(e["peer"], peers)]
    finally:
        os.close(pidfd)


def _remote_sockets(pid: int, pidfd: int) -> Iterator[dict[str, Any]]:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for fd in _socket_fds(pid):
        local_fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if local_fd < 0:
            if ctypes.get_errno() in (errno.EPERM, errno.ENOSYS):
                return
            continue
        try:
            sock = socket.socket(fileno=local_fd)
        except OSError:
            os.close(local_fd)
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
                where = _describe(sock)
                if where:
                    yield {"pid": pid, **where, "fd": fd, **read_options(sock)}
        finally:
            sock.detach()
            os.close(local_fd)


def _socket_fds(pid: int) -> list[int]:
    fds = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                fds.append(int(name))
        except OSError:
            continue
    return fds


def _wanted(peer: str, peers: set[str] | None) -> bool:
    if peers is None:
        return True
    return peer in peers or ":" + peer.rsplit(":", 1)[1] in peers
