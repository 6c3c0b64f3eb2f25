"""The private kombu, Celery and redis-py names the package overrides or reads: each one is
there, takes the parameters the package passes, and is still called upstream.

Runs in every tox env (each pins its own kombu, Celery and redis-py). A failure here means
an upstream release changed what the plugin relies on: the part it names turns itself off
at run time (celery_resilience/internals.py) until the package follows the change.
"""

from __future__ import annotations

import inspect

import pytest
import redis.asyncio.connection
import redis.connection
from celery.concurrency import asynpool, prefork
from kombu import Connection
from kombu.transport import redis as kombu_redis

from celery_resilience import internals
from celery_resilience.redis import ChannelMixin, QoSMixin, TransportMixin
from celery_resilience.worker import pool

pytestmark = pytest.mark.unit

#: Our classes, and the upstream class each one's overrides must exist on.
OVERRIDERS = [
    (ChannelMixin, kombu_redis.Channel),
    (QoSMixin, kombu_redis.QoS),
    (TransportMixin, kombu_redis.Transport),
    (pool.AsynPool, asynpool.AsynPool),
    (pool.TaskPool, prefork.TaskPool),
]


def test_every_listed_name_is_there_with_the_expected_parameters_and_callers() -> None:
    assert internals.problems() == []


def _overrides(ours: type, theirs: type) -> set[str]:
    names = set()
    for cls in ours.__mro__:
        if cls.__module__.startswith("celery_resilience"):
            names |= {
                n
                for n, v in vars(cls).items()
                if callable(v) and not isinstance(v, type) and hasattr(theirs, n)
            }
    return names - {"__init_subclass__", "__class_getitem__"}


@pytest.mark.parametrize(("ours", "theirs"), OVERRIDERS, ids=lambda c: c.__name__)
def test_every_upstream_method_the_package_overrides_is_listed(ours: type, theirs: type) -> None:
    """So that a renamed or no longer called method fails the test above, not silently."""
    listed = {i.name for i in internals.INTERNALS}
    assert _overrides(ours, theirs) - listed == set()


@pytest.mark.parametrize(("ours", "theirs"), OVERRIDERS, ids=lambda c: c.__name__)
def test_each_override_accepts_what_upstream_passes(ours: type, theirs: type) -> None:
    for name in _overrides(ours, theirs):
        upstream = list(inspect.signature(getattr(theirs, name)).parameters.values())
        mine = inspect.signature(getattr(ours, name)).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in mine.values())
        for param in upstream:
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                assert param.name in mine or takes_any, f"{ours.__name__}.{name}: {param.name}"


@pytest.mark.integration
def test_the_instance_state_the_package_reads_exists(redis_url: str) -> None:
    """Attributes kombu sets in ``__init__``, on a real channel of kombu's transport."""
    with Connection(redis_url) as conn:
        channel = conn.channel()
        channel.client.ping()
        assert hasattr(channel, "_queue_cycle") and hasattr(channel.qos, "_delivered")
        assert isinstance(conn.transport.channels, list)
        assert hasattr(conn.transport, "_avail_channels")
        cycle = conn.transport.cycle
        for name in ("_channels", "_chan_to_sock", "_fd_to_chan"):
            assert isinstance(getattr(cycle, name), (set, dict)), name


def test_the_redis_py_methods_the_hook_wraps_exist() -> None:
    for cls in (redis.connection.Connection, redis.asyncio.connection.Connection):
        assert callable(cls._connect) and callable(cls.send_packed_command)
    params = inspect.signature(redis.connection.Connection.send_packed_command).parameters
    assert list(params)[:3] == ["self", "command", "check_health"]
