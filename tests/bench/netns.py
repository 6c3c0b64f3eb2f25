"""A real stateful firewall between a client and a Redis server.

Three network namespaces joined by two veth pairs::

    client (eth0 10.231.x.2/30) ── (to-client .1) fw (to-server .1) ── (eth0 .2/30) server

The addresses exist only inside these namespaces; the host never sees them.  In ``fw``,
nftables forwards only ``ct state established,related`` and new TCP SYNs (plus ICMP), and
conntrack forgets an idle established flow after ``conntrack_timeout`` seconds
(``net.netfilter.nf_conntrack_tcp_timeout_established``, a per-namespace sysctl) with
``nf_conntrack_tcp_loose=0``, so a mid-stream packet of a forgotten flow is not re-adopted:
it is ``ct state invalid`` and dropped silently (like a cloud firewall / NAT gateway) or,
with ``reject_forgotten=True``, answered with a TCP reset.  An idle connection without
keepalive then dies; one with TCP keepalive idle < timeout survives.

Processes are started inside a namespace with ``ip netns exec`` (:meth:`Firewall.run_in`)
and carry PR_SET_PDEATHSIG like every bench child.  Named namespaces are bind mounts that
outlive a SIGKILLed session, so :meth:`Firewall.stop` (also run by the bench's
``stop_all`` at session end and at exit) kills whatever still runs inside them and deletes
them, and every :meth:`Firewall.start` first sweeps namespaces left by dead sessions
(``crfw-<pid>-...`` whose pid is gone).

Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN), ``ip`` (iproute2) and ``nft`` (nftables);
:func:`netns_available` says why not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, TypeVar

import redis

from . import _proc
from .redis_server import RedisServer, _read_reply, no_retry_client

T = TypeVar("T")

PREFIX = "crfw"
ROLES = ("client", "fw", "server")
_NETNS_DIR = "/var/run/netns"
_CLONE_NEWNET = 0x40000000
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_SUBNET_BASE = ipaddress.IPv4Address("10.231.0.0")  # 10.231.0.0/16: 16384 /30 blocks
_BLOCKS = 16384
_TABLE = "crfw"

_counter = itertools.count()
_swept = False
_sweep_lock = threading.Lock()


class FirewallError(RuntimeError):
    """The namespaces, links or ruleset could not be built."""


# -- running code in a namespace --------------------------------------------------------------


def _load_setns() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.setns
    except (OSError, AttributeError):
        return None


_SETNS = _load_setns()


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a throw-away thread that has joined network namespace ``name``.

    The network namespace is per thread: the caller's threads stay where they are.  Sockets
    created by ``fn`` stay in ``name`` for good, whichever thread uses them later; files
    under /proc/sys/net and /proc/thread-self/net opened by ``fn`` are those of ``name``.
    """
    if _SETNS is None:
        raise FirewallError("libc setns() is not available")
    outcome: list[Any] = []

    def run() -> None:
        try:
            fd = os.open(os.path.join(_NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _SETNS(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome.append((True, fn()))
        except BaseException as exc:  # handed back to the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def netns_connect(name: str, address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    """A TCP socket created and connected inside namespace ``name``."""
    return in_netns(name, lambda: socket.create_connection(address, timeout=timeout))


def netns_connection_class(name: str) -> type[redis.Connection]:
    """A redis-py Connection class whose sockets are created inside namespace ``name``.

    ``redis.Redis(..., connection_class=netns_connection_class(ns))`` lets the test process
    itself talk from ``ns``, e.g. to seed or inspect the server without a subprocess.
    """

    class NetnsConnection(redis.Connection):
        def _connect(self) -> socket.socket:
            sock: socket.socket = in_netns(name, super()._connect)
            return sock

    NetnsConnection.__name__ = NetnsConnection.__qualname__ = f"NetnsConnection[{name}]"
    return NetnsConnection


# -- availability -----------------------------------------------------------------------------


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    result = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=30, check=False
    )
    if check and result.returncode != 0:
        raise FirewallError(
            f"{' '.join(argv)} failed with {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def _effective_caps() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


_AVAILABLE: tuple[bool, str] | None = None


def netns_available() -> tuple[bool, str]:
    """(True, "") when a :class:`Firewall` can be built here, else (False, why not)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _check_available()
    return _AVAILABLE


def _check_available() -> tuple[bool, str]:
    if not os.path.isdir("/proc/self/ns") or _SETNS is None:
        return False, "network namespaces need Linux"
    caps = _effective_caps()
    needed = (1 << _CAP_NET_ADMIN) | (1 << _CAP_SYS_ADMIN)
    if os.geteuid() != 0 and caps & needed != needed:
        return False, "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        packages = {"ip": "iproute2", "nft": "nftables"}
        return False, (
            f"missing {', '.join(missing)} (Debian: apt-get install "
            f"{' '.join(packages[t] for t in missing)}; scripts/test installs them as root)"
        )
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
    except FirewallError as exc:
        return False, f"cannot create a network namespace: {exc}"
    try:
        _run(["ip", "netns", "exec", probe, "nft", "-f", "-"], input=_ruleset(False))
        conntrack = in_netns(
            probe,
            lambda: os.path.exists("/proc/sys/net/netfilter/nf_conntrack_tcp_loose"),
        )
        if not conntrack:
            return False, "kernel has no per-namespace nf_conntrack TCP sysctls"
    except (FirewallError, OSError) as exc:
        return False, f"nftables/conntrack unusable in a namespace: {exc}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return True, ""


# -- cleanup of namespaces left by dead sessions ----------------------------------------------

_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-")


def list_namespaces(prefix: str = PREFIX + "-") -> list[str]:
    """Named network namespaces (``ip netns list``) whose name starts with ``prefix``."""
    if shutil.which("ip") is None:
        return []
    names = [line.split()[0] for line in _run(["ip", "netns", "list"], check=False).splitlines()]
    return [name for name in names if name.startswith(prefix)]


def _delete_namespace(name: str, timeout: float = 5.0) -> None:
    """SIGKILL every process still inside ``name``, then delete it (veths go with it)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [int(p) for p in _run(["ip", "netns", "pids", name], check=False).split()]
        pids = [pid for pid in pids if pid != os.getpid() and _proc.pid_alive(pid)]
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    _run(["ip", "netns", "del", name], check=False)


def sweep_stale() -> list[str]:
    """Delete ``crfw-<pid>-*`` namespaces whose creating process is dead; returns them."""
    swept = []
    for name in list_namespaces():
        match = _NAME_RE.match(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _proc.pid_alive(pid):
            _delete_namespace(name)
            swept.append(name)
    return swept


def _sweep_once() -> None:
    global _swept
    with _sweep_lock:
        if not _swept:
            sweep_stale()
            _swept = True


# -- the firewall -----------------------------------------------------------------------------


def _ruleset(reject_forgotten: bool) -> str:
    verdict = "reject with tcp reset" if reject_forgotten else "drop"
    return f"""
table inet {_TABLE} {{
    counter forgotten {{ }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        tcp flags & (syn|ack) == syn ct state new accept
        meta l4proto {{ icmp, ipv6-icmp }} accept
        ct state invalid meta l4proto tcp counter name "forgotten" {verdict}
    }}
}}
"""


def _addresses(pid: int, n: int) -> tuple[str, str, str, str]:
    """(client, fw-client-side, fw-server-side, server) in two /30s of 10.231.0.0/16."""
    index = (pid * 16 + n) % (_BLOCKS // 2)
    client_net = _SUBNET_BASE + 4 * (2 * index)
    server_net = _SUBNET_BASE + 4 * (2 * index + 1)
    return (str(client_net + 2), str(client_net + 1), str(server_net + 1), str(server_net + 2))


class Firewall(_proc.StartClose):
    """client ── fw ── server network namespaces with a conntrack firewall in the middle.

    >>> with Firewall(conntrack_timeout=3) as fw:
    ...     server = fw.redis_server()  # redis-server in "server" on server_addr
    ...     proc = fw.run_in("client", [sys.executable, "-c", "..."])  # talks to server.url()

    ``ns`` arguments take a role (``"client"``, ``"fw"``, ``"server"``) or a full name.
    """

    def __init__(self, conntrack_timeout: int = 3, *, reject_forgotten: bool = False) -> None:
        if conntrack_timeout < 1:
            raise ValueError("conntrack_timeout must be >= 1 second")
        self.conntrack_timeout = int(conntrack_timeout)
        self.reject_forgotten = reject_forgotten
        pid, n = os.getpid(), next(_counter)
        self.names = {role: f"{PREFIX}-{pid}-{n}-{role}" for role in ROLES}
        (self.client_addr, self.fw_client_addr, self.fw_server_addr, self.server_addr) = _addresses(
            pid, n
        )
        self._procs: list[subprocess.Popen[bytes]] = []
        self._servers: list[RedisServer] = []
        self._lock = threading.RLock()
        self._started = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Firewall:
        """Build namespaces, links, routes, sysctls and ruleset. No-op when started."""
        with self._lock:
            if self._started:
                return self
            ok, reason = netns_available()
            if not ok:
                raise FirewallError(reason)
            _sweep_once()
            self._started = True
            _proc.register(self)
            try:
                self._build()
            except BaseException:
                self.stop()
                raise
            return self

    def _build(self) -> None:
        client, fw, server = (self.names[r] for r in ROLES)
        for name in (client, fw, server):
            _run(["ip", "netns", "add", name])
        _run(["ip", "-n", fw, "link", "add", "to-client", "type", "veth",
              "peer", "name", "eth0", "netns", client])  # fmt: skip
        _run(["ip", "-n", fw, "link", "add", "to-server", "type", "veth",
              "peer", "name", "eth0", "netns", server])  # fmt: skip
        for name, dev, addr in (
            (client, "eth0", self.client_addr),
            (fw, "to-client", self.fw_client_addr),
            (fw, "to-server", self.fw_server_addr),
            (server, "eth0", self.server_addr),
        ):
            _run(["ip", "-n", name, "addr", "add", f"{addr}/30", "dev", dev])
            _run(["ip", "-n", name, "link", "set", dev, "up"])
        for name in (client, fw, server):
            _run(["ip", "-n", name, "link", "set", "lo", "up"])
        _run(["ip", "-n", client, "route", "add", "default", "via", self.fw_client_addr])
        _run(["ip", "-n", server, "route", "add", "default", "via", self.fw_server_addr])
        # The ruleset first: its ct expressions load nf_conntrack (where it is a module),
        # which creates the namespace's net.netfilter sysctls.
        _run(["ip", "netns", "exec", fw, "nft", "-f", "-"], input=_ruleset(self.reject_forgotten))
        self._sysctls(
            fw,
            {
                "net/ipv4/ip_forward": 1,
                "net/netfilter/nf_conntrack_tcp_timeout_established": self.conntrack_timeout,
                "net/netfilter/nf_conntrack_tcp_loose": 0,
            },
        )

    @staticmethod
    def _sysctls(name: str, values: dict[str, int]) -> None:
        def write() -> None:
            for key, value in values.items():
                path = f"/proc/sys/{key}"
                with open(path, "w", encoding="ascii") as fh:
                    fh.write(str(value))
                with open(path, encoding="ascii") as fh:
                    got = fh.read().strip()
                if got != str(value):
                    raise FirewallError(f"{name}: {key} is {got} after writing {value}")

        in_netns(name, write)

    def stop(self) -> None:
        """Stop servers and processes, delete the namespaces. Idempotent."""
        with self._lock:
            if not self._started:
                return
            servers, self._servers = self._servers, []
            for server in servers:
                try:
                    server.close()
                except Exception:
                    pass
            procs, self._procs = self._procs, []
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                _proc.kill_group(proc.pid)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            existing = set(list_namespaces(f"{PREFIX}-{os.getpid()}-"))
            for name in self.names.values():
                if name in existing:
                    _delete_namespace(name)
            self._started = False
            _proc.unregister(self)

    close = stop  # the bench registry's protocol

    # -- running things inside --------------------------------------------------------------

    def name(self, ns: str) -> str:
        """Full namespace name for a role, or ``ns`` itself when it is one of ours."""
        if ns in self.names:
            return self.names[ns]
        if ns in self.names.values():
            return ns
        raise ValueError(f"unknown namespace {ns!r}: use one of {ROLES}")

    def exec_prefix(self, ns: str) -> list[str]:
        """``["ip", "netns", "exec", <name>]``: prepend to an argv to run it inside ``ns``."""
        return ["ip", "netns", "exec", self.name(ns)]

    def run_in(self, ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``ns`` (PDEATHSIG, own session); killed by :meth:`stop`."""
        if not self._started:
            raise FirewallError("start() the firewall first")
        proc = _proc.spawn(self.exec_prefix(ns) + list(argv), **popen_kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def redis_server(self, port: int = 6379, **kwargs: Any) -> NetnsRedisServer:
        """A started redis-server inside ``server``, bound to :attr:`server_addr`:``port``.

        The port is private to the namespace, so a fixed one never collides.  Stopped by
        :meth:`stop` (or close it earlier yourself).
        """
        if not self._started:
            raise FirewallError("start() the firewall first")
        server = NetnsRedisServer(self, port, **kwargs)
        with self._lock:
            self._servers.append(server)
        server.start()
        return server

    def connect(self, ns: str, address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
        """A TCP socket created (and connected) inside ``ns``, usable from this process."""
        return netns_connect(self.name(ns), address, timeout)

    def connection_class(self, ns: str) -> type[redis.Connection]:
        """redis-py Connection class whose sockets live in ``ns`` (see netns_connection_class)."""
        return netns_connection_class(self.name(ns))

    # -- inspection -------------------------------------------------------------------------

    def conntrack(self, port: int | None = None) -> list[str] | None:
        """Conntrack entries of ``fw`` (lines of /proc/net/nf_conntrack), optionally only
        those with ``port`` as source or destination port; None when the kernel has no
        procfs view of conntrack (CONFIG_NF_CONNTRACK_PROCFS off).
        """

        def read() -> list[str] | None:
            try:
                with open("/proc/thread-self/net/nf_conntrack", encoding="ascii") as fh:
                    return fh.read().splitlines()
            except FileNotFoundError:
                return None

        lines = in_netns(self.names["fw"], read)
        if lines is None or port is None:
            return lines
        pattern = re.compile(rf"\b(?:sport|dport)={port}\b")
        return [line for line in lines if pattern.search(line)]

    def forgotten_packets(self) -> int:
        """How many TCP packets of unknown (forgotten) flows ``fw`` dropped or rejected."""
        out = _run(["ip", "netns", "exec", self.names["fw"],
                    "nft", "list", "counter", "inet", _TABLE, "forgotten"])  # fmt: skip
        match = re.search(r"packets (\d+)", out)
        if match is None:
            raise FirewallError(f"cannot parse nft counter output: {out!r}")
        return int(match.group(1))

    def block(self) -> None:
        """Drop every forwarded packet (an outage between client and server) until
        :meth:`unblock`; conntrack entries stay, so only the hosts' own timers act."""
        _run(["ip", "netns", "exec", self.names["fw"], "nft", "-f", "-"], input=(
            "table inet crblock {\n chain forward {\n"
            "  type filter hook forward priority -10; policy drop;\n }\n}\n"
        ))  # fmt: skip

    def unblock(self) -> None:
        _run(["ip", "netns", "exec", self.names["fw"], "nft", "delete", "table", "inet", "crblock"])

    def __repr__(self) -> str:
        mode = "reject" if self.reject_forgotten else "drop"
        state = "up" if self._started else "down"
        return (
            f"<Firewall {self.names['fw']} {self.client_addr} -> {self.server_addr} "
            f"timeout={self.conntrack_timeout}s {mode} {state}>"
        )


class NetnsRedisServer(RedisServer):
    """A bench :class:`RedisServer` inside a :class:`Firewall`'s ``server`` namespace.

    Reachable at ``url(db)`` = ``redis://<server_addr>:<port>/<db>`` from the namespaces
    only, not from the host.  ``client()`` connects from inside ``server`` itself (not
    through the firewall), for seeding and inspection.
    """

    def __init__(self, firewall: Firewall, port: int = 6379, **kwargs: Any) -> None:
        self.firewall = firewall
        self.host = firewall.server_addr
        super().__init__(port, **kwargs)

    def _argv(self) -> list[str]:
        # Protected mode would refuse every client not on loopback; the namespace is private.
        return self.firewall.exec_prefix("server") + super()._argv() + ["--protected-mode", "no"]

    def _raw(self, *args: str, timeout: float = 2.0, until_eof: bool = False) -> bytes:
        payload = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = arg.encode()
            payload += b"$%d\r\n%s\r\n" % (len(data), data)
        with self.firewall.connect("server", (self.host, self.port), timeout) as sock:
            sock.sendall(payload)
            return _read_reply(sock, until_eof)

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("connection_class", self.firewall.connection_class("server"))
        return no_retry_client(self.url(db), **kwargs)
