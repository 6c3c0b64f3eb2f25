"""Every private kombu, Celery and redis-py name the package overrides or reads, by part.

kombu's Redis transport and Celery's prefork pool have no public hooks for what the
plugin changes, so its transport, channel, QoS and pool classes override private methods.
Each such name is listed here once, with the parameters the override expects and, for an
override, the upstream code that must still call it (an override nobody calls is dead
code that would pass every test). :func:`available` checks a part's names the first time
the part is used: a missing or changed name turns that part off with one warning, and
the worker runs on without it. ``tests/contract`` asserts every name in every tox env.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
from typing import Any

import kombu

logger = logging.getLogger(__name__)

KOMBU = tuple(kombu.VERSION[:2])


@dataclasses.dataclass(frozen=True)
class Internal:
    """One upstream name: ``owner.name``, called with ``params`` (None: not a callable)."""

    part: str  # what turns off without it
    owner: str  # "module:Class"
    name: str
    params: tuple[str, ...] | None = None  # the leading parameters the package relies on
    caller: str | None = None  # "module:Class" whose code must still call an override

    def problem(self) -> str | None:
        """What is wrong with this name in the installed version; None when all is well."""
        try:
            owner = _resolve(self.owner)
        except (ImportError, AttributeError) as exc:
            return f"{self.owner} is gone ({exc})"
        value: Any = getattr(owner, self.name, _MISSING)
        if value is _MISSING:
            return f"{self.owner}.{self.name} is gone"
        if self.params is not None:
            found = tuple(inspect.signature(value).parameters)[: len(self.params)]
            if found != self.params:
                return f"{self.owner}.{self.name}{found} is not {self.params}"
        caller: Any = _resolve(self.caller) if self.caller is not None else None
        if caller is not None and self.name not in inspect.getsource(caller):
            return f"{self.caller} no longer calls {self.name}"
        return None


_MISSING = object()
_REDIS = "kombu.transport.redis:"
_VIRTUAL = "kombu.transport.virtual.base:"
_ASYNPOOL = "celery.concurrency.asynpool:AsynPool"

INTERNALS: tuple[Internal, ...] = (
    # The atomic fetch (redis/fetch.py): the poller sends and reads kombu's BRPOP there.
    Internal(
        "fetch",
        _REDIS + "Channel",
        "_brpop_start",
        ("self", "timeout"),
        caller=_REDIS + "MultiChannelPoller",
    ),
    Internal("fetch", _REDIS + "Channel", "_brpop_read", ("self",), caller=_REDIS + "Channel"),
    Internal("fetch", _REDIS + "Channel", "_q_for_pri", ("self", "queue", "pri")),
    Internal("fetch", _REDIS + "Channel", "_in_poll"),
    Internal(
        "fetch",
        _REDIS + "QoS",
        "append",
        ("self", "message", "delivery_tag"),
        caller=_VIRTUAL + "Transport",
    ),
    Internal("fetch", _VIRTUAL + "Transport", "_deliver", ("self", "message", "queue")),
    # The stamp (redis/channel.py): every message kombu puts on a list.
    Internal(
        "stamp",
        _REDIS + "Channel",
        "_put",
        ("self", "queue", "message"),
        caller=_VIRTUAL + "Channel",
    ),
    # Restores (redis/qos.py, redis/restore.py).
    Internal(
        "restore",
        _REDIS + "Channel",
        "_do_restore_message",
        ("self", "payload", "exchange", "routing_key", "pipe", "leftmost"),
        caller=_REDIS + "QoS",
    ),
    Internal("restore", _REDIS + "Channel", "_lookup", ("self", "exchange", "routing_key")),
    Internal("restore", _REDIS + "Channel", "_get_message_priority", ("self", "message")),
    Internal("restore", _REDIS + "QoS", "restore_unacked", ("self", "client")),
    Internal(
        "restore",
        _REDIS + "QoS",
        "restore_by_tag",
        ("self", "tag", "client", "leftmost"),
        caller=_REDIS + "QoS",
    ),
    Internal(
        "restore",
        _REDIS + "QoS",
        "_remove_from_indices",
        ("self", "delivery_tag", "pipe"),
        caller=_REDIS + "QoS",
    ),
    Internal("restore", _REDIS + "QoS", "reject", ("self", "delivery_tag", "requeue")),
    Internal("restore", _REDIS + "QoS", "restore_visible", ("self", "start", "num", "interval")),
    Internal("restore", _VIRTUAL + "QoS", "_delivered"),
    # The channel's own state (redis/channel.py).
    Internal("conninfo", _VIRTUAL + "Channel", "__init__", ("self", "connection")),
    # The kept connection info (redis/channel.py): every pool a channel builds.
    Internal(
        "conninfo",
        _REDIS + "Channel",
        "_connparams",
        ("self", "asynchronous"),
        caller=_REDIS + "Channel",
    ),
    # Closing every channel of a lost connection (redis/transport.py).
    Internal("close", _VIRTUAL + "Transport", "close_connection", ("self", "connection")),
    # The event-loop backport, kombu < 5.7 only (redis/channel.py).
    Internal(
        "event loop",
        _REDIS + "Channel",
        "_on_connection_disconnect",
        ("self", "connection"),
        caller=_REDIS + "Channel",
    ),
    Internal("event loop", _REDIS + "MultiChannelPoller", "_register", ("self", "channel")),
    # Keeping the pool's jobs across a lost connection (worker/pool.py).
    Internal(
        "pool", _ASYNPOOL, "flush", ("self",), caller="celery.worker.consumer.consumer:Consumer"
    ),
    Internal("pool", "celery.concurrency.prefork:TaskPool", "Pool"),
    # What the worker runs (worker/running.py).
    Internal("running", "celery.worker.request:Request", "_apply_result"),
    Internal("running", "celery.worker.state", "active_requests"),
    Internal("running", "celery.worker.state", "reserved_requests"),
    Internal("running", "celery.worker.state", "should_stop"),
    Internal("running", "celery.worker.state", "should_terminate"),
)


def _resolve(path: str) -> object:
    module, _, qualname = path.partition(":")
    obj: object = importlib.import_module(module)
    for name in filter(None, qualname.split(".")):
        obj = getattr(obj, name)
    return obj


def problems(part: str | None = None) -> list[str]:
    """What is missing or changed, for one part or all."""
    return [p for i in INTERNALS if part in (None, i.part) for p in [i.problem()] if p]


@functools.cache
def available(part: str) -> bool:
    """Whether ``part`` can run here; the first call for a broken part logs one warning."""
    found = problems(part)
    if found:
        logger.warning("resilience: %s off: this version changed what it overrides (%s)",
                       part, "; ".join(found))  # fmt: skip
    return not found
