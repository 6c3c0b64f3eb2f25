"""Is this error transient? The classifier behind every retry decision.

A *transient* error says "the connection or the server was briefly unable to answer":
the same call is likely to succeed in a moment. A *terminal* error says the call itself
is wrong (WRONGTYPE, bad credentials, missing permissions, bad data): retrying only
repeats it. Anything the catalogue does not know is terminal — retrying unknown errors
is how an 840-item job gets re-run for a bug.

The walk follows ``__cause__`` (``raise X from e``) and ``__context__`` (an error raised
while handling another) so wrappers such as django-redis's ``ConnectionInterrupted`` are
judged by what they wrap. The first exception with a verdict decides: an explicitly
terminal exception stops the walk even if a transient one sits behind it.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import redis.exceptions as rex
from kombu.exceptions import OperationalError

__all__ = ["TERMINAL", "TRANSIENT", "is_transient", "transient_cause"]


def _redis(*names: str) -> tuple[type[BaseException], ...]:
    """The named redis-py exception classes that this redis-py version has."""
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


def _celery_control_flow() -> tuple[type[BaseException], ...]:
    # Retry/Ignore/Reject steer Celery itself; a time limit is the user's decision.
    # Never retry them, whatever context they were raised in.
    from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
    from celery.exceptions import Ignore, Reject, Retry

    return (Retry, Ignore, Reject, SoftTimeLimitExceeded, TimeLimitExceeded)


#: Classes never retried. Checked before TRANSIENT: AuthenticationError and
#: AuthorizationError are redis ConnectionErrors, NoPermissionError a ResponseError.
TERMINAL: tuple[type[BaseException], ...] = _redis(
    "AuthenticationError",
    "AuthorizationError",
    "AuthenticationWrongNumberOfArgsError",
    "NoPermissionError",
    "ExternalAuthProviderError",
)

#: Classes always retried: connection loss, timeouts, a replica promoted or loading,
#: a cluster resharding. (ReadOnlyError: writes to a demoted primary during failover.)
TRANSIENT: tuple[type[BaseException], ...] = (
    *_redis(
        "ConnectionError",
        "TimeoutError",
        "BusyLoadingError",
        "ReadOnlyError",
        "TryAgainError",
        "ClusterDownError",
        "MasterDownError",
    ),
    ConnectionError,  # builtin: ConnectionResetError, BrokenPipeError, ...Refused/Aborted
    TimeoutError,
    socket.timeout,  # an alias of TimeoutError since 3.10, its own OSError before
    OperationalError,  # kombu: the broker could not be reached while publishing
)

# OSErrors that are network trouble even when not raised as a ConnectionError subclass.
_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "EPIPE", "ETIMEDOUT",
        "ENETUNREACH", "ENETDOWN", "ENETRESET", "EHOSTUNREACH", "EHOSTDOWN",
    )
    if hasattr(errno, name)
)  # fmt: skip

_MAX_CHAIN = 32  # cause chains are short; a bound guards against pathological loops


def is_transient(
    exc: BaseException,
    *,
    transient: tuple[type[BaseException], ...] = (),
    terminal: tuple[type[BaseException], ...] = (),
) -> bool:
    """Return True when ``exc`` (or what it wraps) is a transient connection error.

    Args:
        exc: the exception a task raised.
        transient: extra classes to retry (the ``resilience_transient_errors`` setting).
        terminal: extra classes never to retry (``resilience_terminal_errors``); they win
            over ``transient`` and over the built-in catalogue.
    """
    return transient_cause(exc, transient=transient, terminal=terminal) is not None


def transient_cause(
    exc: BaseException,
    *,
    transient: tuple[type[BaseException], ...] = (),
    terminal: tuple[type[BaseException], ...] = (),
) -> BaseException | None:
    """The exception in ``exc``'s chain that makes it transient, or None if it is not."""
    for link in _chain(exc):
        verdict = _verdict(link, transient, terminal)
        if verdict is not None:
            return link if verdict else None
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` then what it wraps: ``__cause__``, else an unsuppressed ``__context__``."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen and len(seen) < _MAX_CHAIN:
        seen.add(id(link))
        yield link
        if link.__cause__ is not None:
            link = link.__cause__
        elif not link.__suppress_context__:
            link = link.__context__
        else:
            link = None


def _verdict(
    exc: BaseException,
    transient: tuple[type[BaseException], ...],
    terminal: tuple[type[BaseException], ...],
) -> bool | None:
    """True/False when this one exception decides; None to look at what it wraps."""
    if isinstance(exc, (terminal, _CONTROL_FLOW)):
        return False
    if isinstance(exc, transient):
        return True
    if isinstance(exc, rex.RedisError):
        return _redis_verdict(exc)
    if isinstance(exc, TRANSIENT):
        return True
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return True
    return None


def _redis_verdict(exc: rex.RedisError) -> bool:
    if isinstance(exc, TERMINAL):
        return False
    # redis-py >= 7.2 tags errors; AUTH is never transient, TLS (certificates,
    # protocol versions) does not fix itself either.
    kind = getattr(getattr(exc, "error_type", None), "value", None)
    if kind in ("auth", "tls"):
        return False
    return isinstance(exc, TRANSIENT)


_CONTROL_FLOW = _celery_control_flow()
