"""A TCP proxy that injects connection resets deterministically.

Races make poor tests: ``CLIENT KILL`` between two commands is harmless (redis-py simply
reconnects at checkout) and in flight it depends on timing.  :class:`ResetProxy` instead sits
between the client and ``redis-server`` and sends a TCP RST on exactly the N-th request that
matches a pattern, either *before* forwarding it (the server never sees the command) or
*after* the server has answered it (the command was applied, the client never learns so).

Matching is per chunk **as received** from the client socket, not per Redis command: a
pipelined batch usually arrives as one chunk (one match, and with ``when="before"`` none of
its commands is forwarded), and a large command can span several chunks (each one that
matches counts).  Sockets use TCP_NODELAY so a client's single write is normally one chunk.

One selector thread serves the listener and every connection with non-blocking sockets and
per-direction buffers, so a slow reader on one side cannot deadlock the other side.
"""

from __future__ import annotations

import re
import selectors
import socket
import struct
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import redis

from . import _proc
from .redis_server import HOST, free_port, no_retry_client

_CHUNK = 65536
_WHEN = ("before", "after")


class _Pair:
    """One proxied connection: the accepted client socket and its upstream socket."""

    def __init__(self, number: int, client: socket.socket, upstream: socket.socket) -> None:
        self.number = number
        self.client = client
        self.upstream = upstream
        self.to_client = bytearray()
        self.to_upstream = bytearray()
        # when="after": the next upstream chunk is the reply to drop before the RST.
        self.reset_on_reply = False
        self.closed = False


class ResetProxy(_proc.StartClose):
    """TCP proxy on 127.0.0.1:``port`` to ``upstream_host:upstream_port`` with RST injection."""

    def __init__(self, upstream_host: str, upstream_port: int, *, port: int | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._port_fixed = port is not None
        self.port = port if port is not None else free_port()
        self.connections = 0  # accepted so far
        self.resets = 0  # RSTs sent by faults and reset_all()
        self.refused = 0  # clients dropped because the upstream was unreachable
        self.events: list[str] = []
        self._arm_lock = threading.Lock()
        self._pattern: re.Pattern[bytes] | None = None
        self._nth = 1
        self._times = 1
        self._when = "before"
        self._matches = 0
        self._pairs: dict[int, _Pair] = {}
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._calls_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        _proc.register(self)

    # -- public API ---------------------------------------------------------------------------

    def start(self) -> ResetProxy:
        """Listen and serve in a background thread (no-op when already running)."""
        if self._thread is not None:
            return self
        self._listener = self._listen()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"reset-proxy-{self.port}")
        self._thread.daemon = True
        self._thread.start()
        return self

    def _listen(self) -> socket.socket:
        # A port from free_port() may be taken (another process) before we bind it: move on,
        # unless the caller fixed the port.
        for attempt in range(5):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((HOST, self.port))
            except OSError:
                listener.close()
                if self._port_fixed or attempt == 4:
                    raise
                self.port = free_port()
                continue
            listener.listen(128)
            listener.setblocking(False)
            return listener
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Close the listener and every connection, join the thread. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join(10)
        self._thread = None

    def close(self) -> None:
        self.stop()
        _proc.unregister(self)

    def arm(self, pattern: bytes, nth: int = 1, *, when: str = "before", times: int = 1) -> None:
        """Reset the connection carrying the ``nth`` (to ``nth+times-1``-th) matching chunk.

        ``pattern`` is a bytes regex searched in each client->server chunk, counted across all
        connections from now on.  ``when="before"`` drops the chunk and sends the RST;
        ``when="after"`` forwards it, waits for the server's first reply chunk, drops that
        and then sends the RST.  Re-arming resets the counters.
        """
        if when not in _WHEN:
            raise ValueError(f"when must be one of {_WHEN}, not {when!r}")
        if nth < 1 or times < 1:
            raise ValueError("nth and times must be >= 1")
        with self._arm_lock:
            self._pattern = re.compile(pattern)
            self._nth, self._times, self._when = nth, times, when
            self._matches = 0

    def disarm(self) -> None:
        with self._arm_lock:
            self._pattern = None
            self._matches = 0

    @property
    def matches(self) -> int:
        """Chunks that matched the armed pattern since the last ``arm``."""
        return self._matches

    def reset_all(self) -> int:
        """RST every open connection now; returns how many were reset."""
        return self._call_in_loop(self._reset_all)  # type: ignore[no-any-return]

    def wait_resets(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until ``resets >= count`` (faults hit asynchronously, e.g. in a worker)."""
        deadline = time.monotonic() + timeout
        while self.resets < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    def url(self, db: int = 0) -> str:
        return f"redis://{HOST}:{self.port}/{db}"

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        """A redis-py client through the proxy, without automatic retries."""
        return no_retry_client(self.url(db), **kwargs)

    def __repr__(self) -> str:
        host, port = self.upstream
        return f"<ResetProxy :{self.port} -> {host}:{port} resets={self.resets}>"

    # -- loop thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        assert self._selector is not None
        try:
            while not self._stopping:
                for key, mask in self._selector.select(timeout=0.5):
                    self._dispatch(key.data, mask)
                self._run_calls()
        finally:
            self._shutdown_sockets()

    def _dispatch(self, data: Any, mask: int) -> None:
        if data == "listen":
            self._accept()
        elif data == "wake":
            self._drain_wake()
        else:
            pair, side = data
            if not pair.closed and mask & selectors.EVENT_WRITE:
                self._flush(pair)
            if not pair.closed and mask & selectors.EVENT_READ:
                self._on_readable(pair, side)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.connections += 1
        number = self.connections
        try:
            upstream = socket.create_connection(self.upstream, timeout=2)
        except OSError as exc:
            # Upstream down (e.g. during a restart): the client sees a reset, not a refusal.
            self.refused += 1
            self.events.append(f"conn#{number}: upstream unreachable ({exc}); client reset")
            _rst(client)
            return
        self._add_pair(_Pair(number, client, upstream))

    def _add_pair(self, pair: _Pair) -> None:
        assert self._selector is not None
        for sock, side in ((pair.client, "client"), (pair.upstream, "upstream")):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._selector.register(sock, selectors.EVENT_READ, (pair, side))
        self._pairs[pair.number] = pair

    def _on_readable(self, pair: _Pair, side: str) -> None:
        sock = pair.client if side == "client" else pair.upstream
        try:
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._close_pair(pair, flush=False)
            return
        if not data:
            self._close_pair(pair, flush=True)
        elif side == "client":
            self._from_client(pair, data)
        else:
            self._from_upstream(pair, data)

    def _from_client(self, pair: _Pair, data: bytes) -> None:
        fault = self._match(data)
        if fault == "before":
            self._reset(pair, f"RST before forwarding {_preview(data)}")
            return
        if fault == "after":
            pair.reset_on_reply = True
            self.events.append(f"conn#{pair.number}: forwarded {_preview(data)}, RST on reply")
        pair.to_upstream += data
        self._flush(pair)

    def _from_upstream(self, pair: _Pair, data: bytes) -> None:
        if pair.reset_on_reply:
            self._reset(pair, f"RST after dropping reply {_preview(data)}")
            return
        pair.to_client += data
        self._flush(pair)

    def _match(self, data: bytes) -> str | None:
        """Count a matching chunk; return the fault mode when this match is one to hit."""
        with self._arm_lock:
            if self._pattern is None or not self._pattern.search(data):
                return None
            self._matches += 1
            if self._nth <= self._matches < self._nth + self._times:
                return self._when
            return None

    def _flush(self, pair: _Pair) -> None:
        """Send what the sockets accept now; watch for writability while data is pending."""
        for sock, buf in ((pair.client, pair.to_client), (pair.upstream, pair.to_upstream)):
            if buf:
                try:
                    sent = sock.send(buf)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._close_pair(pair, flush=False)
                    return
                del buf[:sent]
        self._update_interest(pair)

    def _update_interest(self, pair: _Pair) -> None:
        assert self._selector is not None
        for sock, buf, side in (
            (pair.client, pair.to_client, "client"),
            (pair.upstream, pair.to_upstream, "upstream"),
        ):
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if buf else 0)
            if self._selector.get_key(sock).events != events:
                self._selector.modify(sock, events, (pair, side))

    def _reset(self, pair: _Pair, reason: str) -> None:
        # Count first: a test reading `resets` right after its client saw the RST must see it.
        self.resets += 1
        self.events.append(f"conn#{pair.number}: {reason}")
        self._unregister(pair)
        _rst(pair.client)
        pair.upstream.close()

    def _close_pair(self, pair: _Pair, *, flush: bool) -> None:
        """Orderly close (EOF on one side): deliver what is buffered, then FIN both sides."""
        self._unregister(pair)
        for sock, buf in ((pair.client, pair.to_client), (pair.upstream, pair.to_upstream)):
            if flush and buf:
                _send_best_effort(sock, bytes(buf))
            sock.close()

    def _unregister(self, pair: _Pair) -> None:
        assert self._selector is not None
        pair.closed = True
        self._pairs.pop(pair.number, None)
        for sock in (pair.client, pair.upstream):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass

    def _reset_all(self) -> int:
        pairs = list(self._pairs.values())
        for pair in pairs:
            self._reset(pair, "RST by reset_all()")
        return len(pairs)

    # -- cross-thread calls -------------------------------------------------------------------

    def _call_in_loop(self, fn: Callable[[], Any]) -> Any:
        if self._thread is None:
            return fn() if self._selector is not None else 0
        future: Future[Any] = Future()
        with self._calls_lock:
            self._calls.append((fn, future))
        self._wake()
        return future.result(timeout=10)

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as exc:  # handed back to the calling thread
                future.set_exception(exc)

    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _shutdown_sockets(self) -> None:
        self._run_calls()  # nobody waits forever on a call queued during shutdown
        for pair in list(self._pairs.values()):
            self._close_pair(pair, flush=False)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        self._listener = self._wake_r = self._wake_w = None
        self._selector = None


def _rst(sock: socket.socket) -> None:
    """Close with SO_LINGER (on, 0 s): the kernel sends RST instead of FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _send_best_effort(sock: socket.socket, data: bytes) -> None:
    try:
        sock.settimeout(1.0)
        sock.sendall(data)
    except OSError:
        pass


def _preview(data: bytes, limit: int = 60) -> str:
    text = data[:limit].decode("ascii", "backslashreplace").replace("\r\n", " ")
    return repr(text + ("..." if len(data) > limit else ""))
