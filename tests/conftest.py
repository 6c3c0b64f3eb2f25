"""Shared pytest configuration and fixtures for celery-resilience.

Markers: ``unit`` (no Redis; auto-applied under tests/unit/), ``integration`` (real
redis-server; auto-applied under tests/integration/), ``slow``, ``fault``.

Redis fixtures:

* ``redis_server`` (session): one bench redis-server for the whole session, or the external
  ``$REDIS_URL`` when no binary exists (then it cannot be restarted).  Do not restart it.
* ``redis_url``: URL of db 0 of the session server, **FLUSHALL-ed at test start** (only
  FLUSHDB of the URL's db on an external server), so every test starts from an empty Redis.
* ``private_redis``: a fresh restartable RedisServer per test, skipped without a binary.
* ``reset_proxy``: factory ``make(upstream) -> ResetProxy`` (started; stopped at teardown).
* ``prefork_worker``: factory ``make(app, **kw) -> PreforkWorker`` (started; stopped).

pytest-celery 1.3 clash: its plugin (entry point ``celery``) re-exports the classic
``celery.contrib.pytest`` fixtures but then shadows ``celery_worker`` with a Docker-based,
parametrised one (pytest-celery#442); there is no Docker here.  Conftest fixtures override
plugin fixtures of the same name, so this module defines ``celery_worker`` again as the
classic in-process worker (through :func:`inprocess_worker`, which also applies the GC and
event-loop workarounds) and ``celery_config`` pointing at the session redis-server.  The
Docker entry point of the other fixtures, ``docker_client``, is overridden to fail at once
with an explanation instead of trying to reach a Docker daemon.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Union

import pytest
from blinker import NamedSignal
from celery import Celery
from kombu import Connection

from celery_resilience import install, signals
from celery_resilience.plugin import plugin_of
from celery_resilience.sockets import hooks
from celery_resilience.worker.ledger import Ledger
from celery_resilience.worker.reclaimer import Reclaimer
from tests.bench import (
    ExternalRedis,
    PreforkWorker,
    RedisServer,
    ResetProxy,
    have_redis_server_binary,
    inprocess_worker,
    session_redis_url,
    stop_all,
    tail,
)

SessionRedis = Union[RedisServer, ExternalRedis]

_MARKERS = {
    "unit": "fast test without Redis or network (seconds in total)",
    "integration": "needs a real redis-server (spawned by the test bench)",
    "slow": "takes more than a few seconds",
    "fault": "injects real faults (resets, restarts, kills, firewall drops)",
}

# Directory (relative to tests/) -> marker applied to every test collected in it.
_DIR_MARKERS = {"unit": "unit", "integration": "integration", "soak": "integration"}


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in _MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        relative = os.path.relpath(str(item.path), tests_dir)
        marker = _DIR_MARKERS.get(relative.split(os.sep, 1)[0])
        if marker is not None:
            item.add_marker(marker)


@pytest.fixture(autouse=True)
def _redis_py_hook_undone() -> Iterator[None]:
    """install(app) and the Keepalive step hook redis-py process-wide; no test inherits it."""
    yield
    hooks.disable()


@pytest.fixture
def signals_seen() -> Iterator[list[tuple[str, Any, dict[str, Any]]]]:
    """Every signal of the package sent during the test: (name, sender, kwargs)."""
    seen: list[tuple[str, Any, dict[str, Any]]] = []
    receivers = []
    for name in signals.__all__:
        signal = getattr(signals, name)
        if not isinstance(signal, NamedSignal):
            continue

        def receiver(sender: Any, _name: str = name, **kwargs: Any) -> None:
            seen.append((_name, sender, kwargs))

        signal.connect(receiver)
        receivers.append((signal, receiver))
    yield seen
    for signal, receiver in receivers:
        signal.disconnect(receiver)


class PluginArm:
    """One process's plugin as a worker has it: an app with ``install``, its ledger, and
    kombu connections and a reclaimer on its transport (no worker runs)."""

    def __init__(self, url: str, *, worker: bool = True, **settings: Any) -> None:
        self.url = url
        self.app = Celery("arm", broker=url, set_as_current=False)
        self.app.conf.update({f"resilience_{k}": v for k, v in settings.items()})
        install(self.app, keepalive=False)
        self.plugin = plugin_of(self.app)
        assert self.plugin is not None and self.plugin.serves(self.app.conf)
        self.ledger = self.plugin.ledger = Ledger("test") if worker else None
        self.opened: list[Connection] = []

    def connect(self, url: str | None = None, **transport_options: Any) -> Connection:
        conn = self.app.connection_for_write(url or self.url, transport_options=transport_options)
        self.opened.append(conn)
        return conn

    def reclaimer(self, **transport_options: Any) -> Reclaimer:
        self.app.conf.broker_transport_options = transport_options
        options = self.plugin.fetch_options()
        assert options is not None and self.ledger is not None
        return Reclaimer(self.app, options, self.ledger)

    def close(self) -> None:
        for conn in self.opened:
            conn.release()


@pytest.fixture
def plugin_arm(redis_url: str) -> Iterator[Callable[..., PluginArm]]:
    """Factory: ``make(url=redis_url, *, worker=True, **resilience_settings)`` -> PluginArm."""
    arms: list[PluginArm] = []

    def make(url: str | None = None, **kwargs: Any) -> PluginArm:
        arms.append(PluginArm(url or redis_url, **kwargs))
        return arms[-1]

    yield make
    for arm in arms:
        arm.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Fixtures stop what they start; this catches what tests started by hand and leaked.
    leaked = stop_all()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if leaked and reporter is not None:
        reporter.write_line(f"test bench: stopped {len(leaked)} leaked: {', '.join(leaked)}")


# -- Redis ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[SessionRedis]:
    """The session's Redis: an own redis-server, or $REDIS_URL when no binary exists."""
    external = session_redis_url()
    if external is not None:
        yield ExternalRedis(external)
        return
    yield from _running_server()


def _collect_garbage() -> None:
    """Collect cyclic garbage while the servers are still up.

    Celery's ``AsyncResult.__del__`` unsubscribes from the result backend; run at exit
    against a stopped server, celery 5.3 retries that 20 times a second apart (a 20 s hang).
    """
    gc.collect()


@pytest.fixture
def redis_url(redis_server: SessionRedis) -> str:
    """db 0 of the session Redis, emptied at test start (FLUSHALL; FLUSHDB if external)."""
    client = redis_server.client()
    try:
        if isinstance(redis_server, ExternalRedis):
            client.flushdb()
        else:
            client.flushall()
    finally:
        client.close()
    return redis_server.url(0)


def _running_server() -> Iterator[RedisServer]:
    """A started RedisServer, stopped (after a GC pass, see _collect_garbage) when done."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        _collect_garbage()
        server.close()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A fresh redis-server for this test only: restart/kill/pause it freely."""
    if not have_redis_server_binary():
        pytest.skip("needs a redis-server binary (only an external REDIS_URL is available)")
    yield from _running_server()


@pytest.fixture
def reset_proxy() -> Iterator[Callable[[Any], ResetProxy]]:
    """Factory: ``make(upstream)`` -> a started ResetProxy in front of ``upstream``.

    ``upstream`` is anything with ``host`` and ``port`` (RedisServer, ExternalRedis).
    """
    proxies: list[ResetProxy] = []

    def make(upstream: Any) -> ResetProxy:
        proxy = ResetProxy(upstream.host, upstream.port).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        # Shown by pytest only when the test failed: which faults actually fired.
        print(f"{proxy!r} events:", *proxy.events, sep="\n  ")
        proxy.close()


# -- workers ----------------------------------------------------------------------------------


@pytest.fixture
def prefork_worker() -> Iterator[Callable[..., PreforkWorker]]:
    """Factory: ``make(app, **PreforkWorker kwargs)`` -> a started worker, stopped at teardown."""
    workers: list[PreforkWorker] = []

    def make(app: str, **kwargs: Any) -> PreforkWorker:
        worker = PreforkWorker(app, **kwargs)
        workers.append(worker)
        return worker.start()

    yield make
    for worker in workers:
        log = worker.log  # read before close() deletes it; shown only for failed tests
        worker.close()
        print(f"--- {worker!r} log tail ---\n{tail(log, 60)}")


# -- classic celery.contrib.pytest fixtures, made usable next to pytest-celery 1.3 -------------


@pytest.fixture
def celery_config(redis_url: str) -> Mapping[str, Any]:
    """Broker and result backend on the (flushed) session Redis.

    Function-scoped so each test starts from an empty Redis; a test that wants
    ``celery_session_app`` must override this fixture with a session-scoped one.
    """
    return {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "broker_connection_retry_on_startup": True,
    }


@pytest.fixture
def celery_worker(
    request: pytest.FixtureRequest,
    celery_app: Any,
    celery_includes: Sequence[str],
    celery_worker_pool: str,
    celery_worker_parameters: Mapping[str, Any],
) -> Iterator[Any]:
    """The classic in-process worker (celery.contrib.pytest), not pytest-celery's Docker one."""
    for module in celery_includes:
        celery_app.loader.import_task_module(module)
    with inprocess_worker(celery_app, pool=celery_worker_pool, **celery_worker_parameters) as w:
        yield w


@pytest.fixture(scope="session")
def docker_client() -> None:
    """Fail fast: pytest-celery's container fixtures need Docker, which this project avoids."""
    pytest.fail(
        "a Docker-based pytest-celery fixture was requested; this project runs Celery "
        "against local redis-server processes (tests/bench) - use celery_app/celery_worker "
        "or the bench fixtures instead",
        pytrace=False,
    )
