"""Keepalive options: what each Redis socket gets, and reading them back from the kernel.

Seed values (a cloud firewall that drops connections idle for 3600 s): the first probe
after 60 s idle, then every 10 s, give up after 9; ``TCP_USER_TIMEOUT`` bounds
unacknowledged writes the same way (60 + 10 x 9 = 150 s).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Any, Callable

from ..config import Settings

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KeepaliveOptions:
    """Seconds: first probe after ``idle``, then every ``interval``, give up after
    ``count``; ``user_timeout`` bounds unacknowledged data (0: the kernel default)."""

    idle: int = 60
    interval: int = 10
    count: int = 9
    user_timeout: int = 150


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


# (level, name of the socket-module constant, value getter). TCP_KEEPIDLE is called
# TCP_KEEPALIVE on macOS; TCP_USER_TIMEOUT is Linux-only.
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
