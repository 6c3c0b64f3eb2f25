"""The process-wide redis-py hook: keepalive on every new socket, and the heal.

redis-py has no hook between creating a socket and using it, and the clients that need
keepalive are built by other libraries (Celery's result backend, django-redis, the
application's own). So four redis-py methods are wrapped in place, the only in-place
patches the package makes, applied by :func:`enable` and undone by :func:`disable`:

- ``Connection._connect`` (sync, and TLS: ``SSLConnection`` calls it before wrapping) and
  ``redis.asyncio``'s: each new TCP socket gets the keepalive options; Unix sockets are
  skipped.
- ``send_packed_command`` (sync and asyncio): the heal. Keepalive turns a dead path into a
  socket the kernel has closed, and redis-py writes to a pooled socket without checking
  it; pools built from URLs have no retries, so the first write failed with ``Broken
  pipe``. A connection idle for a second or more has its socket's TCP state checked
  before the write and is reconnected if the kernel closed it: nothing has been sent, so
  no command is repeated. redis-py >= 8.2 reconnects a pooled connection whose socket
  timed out when the pool hands it out; the check then finds a live socket. It still
  heals what that does not reach: connections used without a checkout, and asyncio.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any, Callable

from .options import KeepaliveOptions, apply

logger = logging.getLogger(__name__)

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]

_Provider = Callable[[], "KeepaliveOptions | None"]
_provider: _Provider | None = None
_heal = True
# (class, name) -> the class's own attribute, or None where it inherits it
_originals: dict[tuple[type, str], Any] = {}


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


def async_socket(conn: Any) -> Any:
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
        if _needs_heal(self, async_socket(self)):
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
    for cls, name, wrap in _targets():
        if (cls, name) not in _originals:
            _originals[(cls, name)] = cls.__dict__.get(name)
            setattr(cls, name, wrap(getattr(cls, name)))


def disable() -> None:
    """Undo :func:`enable` (tests; a process that wants redis-py untouched)."""
    global _provider
    _provider = None
    while _originals:
        (cls, name), original = _originals.popitem()
        if original is None:
            delattr(cls, name)
        else:
            setattr(cls, name, original)


def enabled() -> bool:
    return bool(_originals)
