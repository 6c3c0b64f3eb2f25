"""Every row of the classifier's catalogue, and the cause-chain walk."""

from __future__ import annotations

import errno
import socket

import pytest
import redis.exceptions as rex
from celery.exceptions import Ignore, Reject, Retry
from django_redis.exceptions import ConnectionInterrupted
from kombu.exceptions import OperationalError

from celery_resilience import is_transient, transient_cause


def _redis(name: str, *args: object) -> BaseException:
    if not hasattr(rex, name):
        pytest.skip(f"redis-py has no {name}")
    return getattr(rex, name)(*args)  # type: ignore[no-any-return]


RETRIED = [
    ("redis ConnectionError", lambda: rex.ConnectionError("Connection reset by peer")),
    ("redis TimeoutError", lambda: rex.TimeoutError("Timeout reading from socket")),
    ("BusyLoadingError", lambda: _redis("BusyLoadingError", "LOADING")),
    ("ReadOnlyError", lambda: _redis("ReadOnlyError", "READONLY")),
    ("TryAgainError", lambda: _redis("TryAgainError", "TRYAGAIN")),
    ("ClusterDownError", lambda: _redis("ClusterDownError", "CLUSTERDOWN")),
    ("MasterDownError", lambda: _redis("MasterDownError", "MASTERDOWN")),
    ("MaxConnectionsError", lambda: _redis("MaxConnectionsError", "pool exhausted")),
    ("builtin ConnectionResetError", lambda: ConnectionResetError(104, "reset")),
    ("builtin BrokenPipeError", lambda: BrokenPipeError(32, "broken pipe")),
    ("builtin ConnectionRefusedError", lambda: ConnectionRefusedError(111, "refused")),
    ("builtin TimeoutError", lambda: TimeoutError("timed out")),
    ("socket.timeout", lambda: socket.timeout("timed out")),
    ("OSError EHOSTUNREACH", lambda: OSError(errno.EHOSTUNREACH, "no route")),
    ("kombu OperationalError", lambda: OperationalError("Error 111 connecting")),
]

NOT_RETRIED = [
    ("AuthenticationError", lambda: rex.AuthenticationError("invalid password")),
    ("AuthorizationError", lambda: _redis("AuthorizationError", "NOAUTH")),
    ("NoPermissionError", lambda: _redis("NoPermissionError", "NOPERM")),
    ("WRONGTYPE ResponseError", lambda: rex.ResponseError("WRONGTYPE Operation")),
    ("OutOfMemoryError", lambda: _redis("OutOfMemoryError", "OOM")),
    ("DataError", lambda: rex.DataError("Invalid input of type: 'dict'")),
    ("InvalidResponse", lambda: rex.InvalidResponse("Protocol Error")),
    ("WatchError", lambda: rex.WatchError("watched key changed")),
    ("ValueError", lambda: ValueError("bad")),
    ("KeyError", lambda: KeyError("missing")),
    ("OSError ENOENT", lambda: OSError(errno.ENOENT, "no such file")),
    ("celery Retry", lambda: Retry("retry", rex.ConnectionError("x"))),
    ("celery Ignore", lambda: Ignore()),
    ("celery Reject", lambda: Reject(rex.ConnectionError("x"), requeue=False)),
]


@pytest.mark.parametrize(("label", "make"), RETRIED, ids=[r[0] for r in RETRIED])
def test_retried(label: str, make: object) -> None:
    assert is_transient(make()) is True  # type: ignore[operator]


@pytest.mark.parametrize(("label", "make"), NOT_RETRIED, ids=[r[0] for r in NOT_RETRIED])
def test_not_retried(label: str, make: object) -> None:
    assert is_transient(make()) is False  # type: ignore[operator]


def _raise_from(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as caught:
        return caught


def _raise_during(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 - implicit __context__ is the point
    except BaseException as caught:
        return caught


def test_django_redis_wrapper_is_judged_by_its_cause() -> None:
    reset = rex.ConnectionError("Error while reading from redis:6379 : (104, reset)")
    wrapped = _raise_from(ConnectionInterrupted(connection=None), reset)
    assert is_transient(wrapped) is True
    assert transient_cause(wrapped) is reset


def test_django_redis_wrapper_of_wrongtype_is_terminal() -> None:
    wrapped = _raise_from(ConnectionInterrupted(connection=None), rex.ResponseError("WRONGTYPE"))
    assert is_transient(wrapped) is False


def test_wrapper_without_cause_is_terminal() -> None:
    assert is_transient(ConnectionInterrupted(connection=None)) is False


def test_implicit_context_is_followed() -> None:
    assert is_transient(_raise_during(RuntimeError("state"), ConnectionResetError())) is True


def test_suppressed_context_is_not_followed() -> None:
    try:
        try:
            raise ConnectionResetError()
        except ConnectionResetError:
            raise RuntimeError("state") from None
    except RuntimeError as exc:
        assert is_transient(exc) is False


def test_terminal_in_front_stops_the_walk() -> None:
    exc = _raise_from(rex.AuthenticationError("bad password"), ConnectionResetError())
    assert is_transient(exc) is False


def test_celery_retry_raised_while_handling_a_transient_is_not_retried_again() -> None:
    exc = _raise_during(Retry("user asked", None), rex.ConnectionError("reset"))
    assert is_transient(exc) is False


def test_error_type_auth_wins_over_class() -> None:
    exc = rex.ConnectionError("external auth failed")
    if not hasattr(exc, "error_type"):
        pytest.skip("redis-py < 7.2 has no error_type")
    exc.error_type = rex.ExceptionType.AUTH
    assert is_transient(exc) is False


def test_user_lists_override_the_catalogue() -> None:
    class Flaky(Exception):
        pass

    assert is_transient(Flaky()) is False
    assert is_transient(Flaky(), transient=(Flaky,)) is True
    assert is_transient(rex.ConnectionError(), terminal=(rex.ConnectionError,)) is False
    assert is_transient(Flaky(), transient=(Flaky,), terminal=(Flaky,)) is False


def test_cyclic_chain_terminates() -> None:
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert is_transient(a) is False
