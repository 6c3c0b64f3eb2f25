"""The keepalive hook on real loopback sockets (no Redis): values, undo, failure isolation."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest
import redis.connection

from celery_resilience import ConfigurationError, Settings, keepalive
from celery_resilience.keepalive import KeepaliveOptions
from celery_resilience.sockets import hooks

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux options")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


def test_apply_sets_exact_values(listener: socket.socket) -> None:
    with socket.create_connection(listener.getsockname()) as sock:
        assert keepalive.apply(sock, KeepaliveOptions(60, 10, 9, 150)) is True
        assert keepalive.read_options(sock) == {
            "keepalive": 1, "idle": 60, "interval": 10, "count": 9, "user_timeout": 150.0,
        }  # fmt: skip


def test_unix_sockets_are_skipped() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert keepalive.apply(a, KeepaliveOptions()) is False


def test_closed_socket_is_reported_not_raised(listener: socket.socket) -> None:
    sock = socket.create_connection(listener.getsockname())
    sock.close()
    assert keepalive.apply(sock, KeepaliveOptions()) is False


def test_hook_applies_to_new_connections_and_undo_restores(listener: socket.socket) -> None:
    original = redis.connection.Connection._connect
    host, port = listener.getsockname()
    keepalive.enable(lambda: KeepaliveOptions(idle=42))
    assert redis.connection.Connection._connect is not original
    sock = redis.connection.Connection(host=host, port=port, socket_keepalive=False)._connect()
    with sock:
        assert keepalive.read_options(sock)["idle"] == 42
    keepalive.disable()
    assert redis.connection.Connection._connect is original
    sock = redis.connection.Connection(host=host, port=port, socket_keepalive=False)._connect()
    with sock:
        assert keepalive.read_options(sock)["keepalive"] == 0  # redis-py left alone again


def test_enable_twice_only_replaces_the_provider(listener: socket.socket) -> None:
    keepalive.enable(lambda: KeepaliveOptions(idle=11))
    patched = redis.connection.Connection._connect
    keepalive.enable(lambda: KeepaliveOptions(idle=22))
    assert redis.connection.Connection._connect is patched
    host, port = listener.getsockname()
    with redis.connection.Connection(host=host, port=port)._connect() as sock:
        assert keepalive.read_options(sock)["idle"] == 22


def test_a_failing_provider_never_breaks_the_connect(
    listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> KeepaliveOptions:
        raise ConfigurationError("resilience_keepalive_idle", -1, "must be between 1 and 3599")

    keepalive.enable(broken)
    host, port = listener.getsockname()
    with (
        caplog.at_level(logging.ERROR),
        redis.connection.Connection(host=host, port=port)._connect(),
    ):
        pass
    assert "keepalive options unavailable" in caplog.text


def test_options_from_settings() -> None:
    assert keepalive.options_from(Settings()) == KeepaliveOptions(60, 10, 9, 150)
    assert keepalive.options_from(Settings(keepalive_idle=30, keepalive_count=3)) == (
        KeepaliveOptions(30, 10, 3, 60)
    )
    assert keepalive.options_from(Settings(keepalive_user_timeout=0)).user_timeout == 0
    assert keepalive.options_from(Settings(keepalive=False)) is None


@pytest.mark.parametrize(
    ("key", "value"),
    [("keepalive_idle", 7200), ("keepalive_idle", 0), ("keepalive_count", 0),
     ("keepalive_interval", -5), ("keepalive_user_timeout", -1), ("keepalive", "sometimes")],
)  # fmt: skip
def test_bad_keepalive_settings_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=f"resilience_{key}="):
        Settings.from_conf({f"resilience_{key}": value})


def test_a_socket_the_peer_closed_counts_as_aborted(listener: socket.socket) -> None:
    with socket.create_connection(listener.getsockname()) as sock:
        peer, _ = listener.accept()
        assert hooks._aborted(sock) is False
        peer.close()  # FIN: our side goes to CLOSE_WAIT
        time.sleep(0.05)
        assert hooks._aborted(sock) is True


def test_undo_restores_inherited_methods() -> None:
    import redis.asyncio.connection as aconn

    names = [(cls, n) for cls in (redis.connection.Connection, aconn.Connection)
             for n in ("_connect", "send_packed_command")]  # fmt: skip
    before = {(cls, n): cls.__dict__.get(n) for cls, n in names}
    originals = {(cls, n): getattr(cls, n) for cls, n in names}
    keepalive.enable(lambda: None)
    assert all(getattr(cls, n).__wrapped__ is originals[cls, n] for cls, n in names)
    keepalive.disable()
    assert {(cls, n): cls.__dict__.get(n) for cls, n in names} == before
