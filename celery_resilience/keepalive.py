"""TCP keepalive on every Redis connection this process opens (seed 000).

redis-py < 8 sets no SO_KEEPALIVE; redis-py 8 does, but kombu passes
``socket_keepalive=None`` explicitly, the result backend only has a boolean, and
django-redis has no option of its own. A host-level sysctl does not help: the kernel
only probes sockets that opted in. So we opt every socket in, whatever each library asked:

- :func:`enable` patches redis-py's TCP connect (sync and asyncio; TLS sockets get the
  options before the handshake, Unix sockets are skipped) so each *new* socket gets
  SO_KEEPALIVE, TCP_KEEPIDLE/INTVL/CNT and TCP_USER_TIMEOUT;
- :func:`sweep` applies them to connections that were already open (import time);
- :func:`audit` reads the options back from the kernel, for this process;
  :func:`audit_process` does the same for another process (a prefork child).

The patch is process-wide (redis-py's connection classes are). :func:`disable` undoes it.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any, Callable

from ._patch import Patches, Wrap
from .config import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "KeepaliveOptions",
    "apply",
    "audit",
    "audit_process",
    "disable",
    "enable",
    "options_from",
    "sweep",
]


@dataclasses.dataclass(frozen=True)
class KeepaliveOptions:
    """Seconds: first probe after ``idle``, then every ``interval``, give up after
    ``count``; ``user_timeout`` bounds unacknowledged data (0: the kernel default)."""

    idle: int = 60
    interval: int = 10
    count: int = 9
    user_timeout: int = 150


# (level, name of the socket-module constant, value getter). TCP_KEEPIDLE is called
# TCP_KEEPALIVE on macOS; TCP_USER_TIMEOUT is Linux-only.
def options_from(settings: Settings) -> KeepaliveOptions | None:
    """The options the settings ask for; None when ``resilience_keepalive`` is off."""
    if not settings.keepalive:
        return None
    user_timeout = settings.keepalive_user_timeout
    if user_timeout is None:
        user_timeout = (
            settings.keepalive_idle + settings.keepalive_interval * settings.keepalive_count
        )
    return KeepaliveOptions(
        settings.keepalive_idle, settings.keepalive_interval, settings.keepalive_count,
        user_timeout,
    )  # fmt: skip


_OPTIONS: tuple[tuple[int, tuple[str, ...], Callable[[KeepaliveOptions], int]], ...] = (
    (socket.SOL_SOCKET, ("SO_KEEPALIVE",), lambda o: 1),
    (socket.IPPROTO_TCP, ("TCP_KEEPIDLE", "TCP_KEEPALIVE"), lambda o: o.idle),
    (socket.IPPROTO_TCP, ("TCP_KEEPINTVL",), lambda o: o.interval),
    (socket.IPPROTO_TCP, ("TCP_KEEPCNT",), lambda o: o.count),
    (socket.IPPROTO_TCP, ("TCP_USER_TIMEOUT",), lambda o: o.user_timeout * 1000),
)
_missing_warned: set[str] = set()


def _constant(names: tuple[str, ...]) -> int | None:
    for name in names:
        if hasattr(socket, name):
            return int(getattr(socket, name))
    if names[0] not in _missing_warned:
        _missing_warned.add(names[0])
        logger.warning("resilience: this platform has no %s; that option is skipped", names[0])
    return None


def apply(sock: Any, options: KeepaliveOptions) -> bool:
    """Set the keepalive options on ``sock``; False for non-TCP or closed sockets."""
    if sock is None or getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        for level, names, value in _OPTIONS:
            opt = _constant(names)
            if opt is not None:
                sock.setsockopt(level, opt, value(options))
    except OSError as exc:  # closed or shut down under us: nothing to protect
        logger.debug("resilience: keepalive not applied to %r: %s", sock, exc)
        return False
    return True


# -- the connect hook -----------------------------------------------------------------------

_Provider = Callable[[], "KeepaliveOptions | None"]
_provider: _Provider | None = None
_heal = True
_patches = Patches()


def _options() -> KeepaliveOptions | None:
    try:
        return _provider() if _provider is not None else None
    except Exception:  # a bad setting must not break the caller's connect
        logger.exception("resilience: keepalive options unavailable; socket left as is")
        return None


def _patched_connect(original: Callable[..., Any]) -> Callable[..., Any]:
    # redis-py has no hook between socket creation and use: Connection._connect is
    # the one function that returns the connected TCP socket (SSLConnection calls it
    # before wrapping, so TLS sockets are covered too).
    def _connect(self: Any) -> Any:
        sock = original(self)
        options = _options()
        if options is not None:
            apply(sock, options)
        return sock

    _connect.__wrapped__ = original  # type: ignore[attr-defined]
    return _connect


def _patched_async_connect(original: Callable[..., Any]) -> Callable[..., Any]:
    # redis.asyncio's Connection._connect opens the stream and keeps the writer; the
    # socket is only reachable through the transport afterwards.
    async def _connect(self: Any) -> None:
        await original(self)
        options = _options()
        writer = getattr(self, "_writer", None)
        if options is not None and writer is not None:
            apply(writer.transport.get_extra_info("socket"), options)

    _connect.__wrapped__ = original  # type: ignore[attr-defined]
    return _connect


_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of struct tcp_info (Linux)
_HEAL_AFTER_IDLE = 1.0  # seconds; keepalive (idle >= 1 s) cannot abort a busier socket


def _aborted(sock: Any) -> bool:
    """Whether the kernel has closed this socket (keepalive timeout, peer gone)."""
    try:
        if hasattr(socket, "TCP_INFO"):
            return bool(
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _TCP_ESTABLISHED
            )
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0)
    except (OSError, ValueError):
        return True


def _needs_heal(conn: Any, sock: Any) -> bool:
    """Whether ``conn``, about to write, idled a second or more on a socket the kernel closed."""
    now = time.monotonic()
    idle = now - conn.__dict__.get("_resilience_sent", now)
    conn.__dict__["_resilience_sent"] = now
    return sock is not None and _heal and idle >= _HEAL_AFTER_IDLE and _aborted(sock)


def _heal_warning(conn: Any) -> None:
    logger.warning(
        "resilience: reconnecting %s to %s: the kernel closed the idle socket",
        type(conn).__module__.rsplit(".", 1)[0], conn._host_error(),
    )  # fmt: skip


def _patched_send(original: Callable[..., Any]) -> Callable[..., Any]:
    # Keepalive turns a dead path into a socket the kernel has closed, but redis-py writes
    # to a pooled socket without checking it, and pools built from URLs (kombu, Celery's
    # result backend, django-redis) have no retry: the first write fails with EPIPE.
    # Checked here, before anything is written, reconnecting cannot duplicate a command.
    def send_packed_command(self: Any, command: Any, check_health: bool = True) -> Any:
        if _needs_heal(self, self._sock):
            _heal_warning(self)
            self.disconnect()
        return original(self, command, check_health)

    send_packed_command.__wrapped__ = original  # type: ignore[attr-defined]
    return send_packed_command


def _async_socket(conn: Any) -> Any:
    """The socket under a redis.asyncio connection's stream, or None when not connected."""
    writer = getattr(conn, "_writer", None)
    return writer.transport.get_extra_info("socket") if writer is not None else None


def _patched_async_send(original: Callable[..., Any]) -> Callable[..., Any]:
    # The same heal for redis.asyncio. A loop that is not running between calls (a loop a
    # thread keeps, run_until_complete per job) sees the kernel's abort only when it next
    # polls, in the middle of redis-py's write: on Python 3.12.1 with redis-py 4.6 the
    # transport is closed under writelines() and the job fails with AttributeError
    # ('_add_writer'), which nothing retries. redis-py reconnects in send_packed_command
    # once disconnected, so healing here writes the command exactly once.
    async def send_packed_command(self: Any, command: Any, check_health: bool = True) -> Any:
        if _needs_heal(self, _async_socket(self)):
            _heal_warning(self)
            await self.disconnect(nowait=True)
        return await original(self, command, check_health)

    send_packed_command.__wrapped__ = original  # type: ignore[attr-defined]
    return send_packed_command


def _targets() -> Iterator[tuple[type, str, Wrap]]:
    import redis.connection

    yield redis.connection.Connection, "_connect", _patched_connect
    yield redis.connection.Connection, "send_packed_command", _patched_send
    try:
        import redis.asyncio.connection as aconn
    except ImportError:  # redis-py built without asyncio support
        return
    yield aconn.Connection, "_connect", _patched_async_connect
    yield aconn.Connection, "send_packed_command", _patched_async_send


def enable(provider: _Provider, *, heal: bool = True) -> None:
    """Patch redis-py so every new TCP connection gets ``provider()``'s options.

    ``provider`` is called per connect (cheap: settings are cached) and may return None
    to leave a socket alone. With ``heal``, a connection idle for a second or more is
    reconnected before a write when the kernel has closed its socket. Calling ``enable``
    again only replaces the provider and the heal flag.
    """
    global _provider, _heal
    _provider, _heal = provider, heal
    _patches.apply(_targets())


def disable() -> None:
    """Undo :func:`enable` (tests; a process that wants redis-py untouched)."""
    global _provider
    _provider = None
    _patches.undo()


def enabled() -> bool:
    return bool(_patches)


# -- sweep and audit ------------------------------------------------------------------------


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
            sock = _async_socket(obj)
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


def read_options(sock: Any) -> dict[str, Any]:
    """The keepalive options of ``sock`` as the kernel has them (seconds)."""
    report: dict[str, Any] = {}
    for level, names, _ in _OPTIONS:
        opt = _constant(names)
        if opt is None:
            continue
        try:
            value = sock.getsockopt(level, opt)
        except OSError:
            continue
        key = {"SO_KEEPALIVE": "keepalive", "TCP_KEEPIDLE": "idle", "TCP_KEEPALIVE": "idle",
               "TCP_KEEPINTVL": "interval", "TCP_KEEPCNT": "count",
               "TCP_USER_TIMEOUT": "user_timeout"}[names[0]]  # fmt: skip
        report[key] = value / 1000 if key == "user_timeout" else value
    return report


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
