"""Routing: a task message remembers where it was sent, and goes back there (seed 002).

Three pieces, registered by :func:`install_routing` (``install(app)`` calls it):

- **The stamp.** A ``before_task_publish`` receiver writes the message's destination into
  four plain headers, unless the message already has them (a retry copies its request's
  headers, so it keeps the first stamp; an explicit stamp from the caller wins too):

  ================================= ====================================================
  ``resilience_origin_queue``       the queue Celery routed the task to (None: unknown)
  ``resilience_origin_exchange``    the exchange it was published to (``""``: default)
  ``resilience_origin_routing_key`` its routing key
  ``resilience_origin_priority``    its priority (None: the transport's default)
  ================================= ====================================================

- **Retry pinning.** :func:`retry_options` gives ``Task.retry`` the stamped queue and
  priority, so a retry goes back to the origin whatever ``task_routes``, the default
  queue or the queue the message was last taken from (quarantine) say.
- **The restore guard.** kombu's Redis transport hands a reserved message back (warm or
  cold shutdown, ``reject(requeue=True)``, the visibility-timeout sweep) through
  ``Channel._do_restore_message``, which re-derives the destination from the exchange,
  routing key and priority instead of the list the message came from: kombu <= 5.3 drops
  the priority (every message lands in the bare key, the list polled first), and an
  exchange the restoring worker never declared resolves to no queue at all (the message
  is lost). The guard restores a stamped message to its stamped queue's list for its
  stamped priority; an unstamped message is left to kombu, except that one kombu would
  drop goes to the quarantine queue (``resilience_quarantine_queue``) with a warning.

The receiver and the patch are process-wide (Celery's signal and kombu's class are);
:func:`disable` undoes both.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, cast

from celery.signals import before_task_publish

from . import signals
from .config import settings_for

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_QUARANTINE_QUEUE",
    "EXCHANGE_HEADER",
    "HEADERS",
    "PRIORITY_HEADER",
    "QUEUE_HEADER",
    "ROUTING_KEY_HEADER",
    "Origin",
    "RoutingOptions",
    "disable",
    "enable",
    "install_routing",
    "origin_from_headers",
    "retry_options",
    "stamp",
]

QUEUE_HEADER = "resilience_origin_queue"
EXCHANGE_HEADER = "resilience_origin_exchange"
ROUTING_KEY_HEADER = "resilience_origin_routing_key"
PRIORITY_HEADER = "resilience_origin_priority"
HEADERS = (QUEUE_HEADER, EXCHANGE_HEADER, ROUTING_KEY_HEADER, PRIORITY_HEADER)
# Dotted like Celery's own "celery.*" names, so it cannot clash with an application queue.
DEFAULT_QUARANTINE_QUEUE = "resilience.quarantine"
# AMQP's priority range. kombu's Redis transport clamps to 0-9 itself, as at publish.
_MAX_PRIORITY = 255
_DISPATCH_UID = "celery_resilience.routing.stamp"
_ROUTING_OPTIONS = ("queue", "exchange", "routing_key")


@dataclasses.dataclass(frozen=True)
class RoutingOptions:
    """What the routing pieces need from the settings."""

    quarantine_queue: str = DEFAULT_QUARANTINE_QUEUE


def options_from(settings: Any) -> RoutingOptions | None:
    """The options the settings ask for; None when ``resilience_routing`` is off."""
    if not settings.routing:
        return None
    return RoutingOptions(settings.quarantine_queue)


# -- the stamp --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a task message was first published to."""

    queue: str | None
    exchange: str
    routing_key: str
    priority: int | None

    def headers(self) -> dict[str, Any]:
        return dict(zip(HEADERS, (self.queue, self.exchange, self.routing_key, self.priority)))


def origin_of(
    exchange: Any, routing_key: Any, declare: Iterable[Any] | None, properties: Mapping[str, Any]
) -> Origin:
    """The origin of a message Celery is about to publish (``before_task_publish`` args)."""
    exchange = _name(exchange)
    routing_key = routing_key or ""
    # Celery sends direct-exchange queues through the default exchange with the queue
    # name as routing key; other exchanges only say which queue through `declare`.
    queue = routing_key if exchange == "" else _declared_queue(exchange, routing_key, declare)
    return Origin(queue or None, exchange, routing_key, _priority(properties.get("priority")))


def _name(entity: Any) -> str:
    return str(getattr(entity, "name", entity) or "")


def _declared_queue(exchange: str, routing_key: str, declare: Iterable[Any] | None) -> str | None:
    for entity in declare or ():
        queue = getattr(entity, "name", None)
        bound = queue and _name(getattr(entity, "exchange", None)) == exchange
        if bound and _binds(entity, exchange, routing_key):
            return str(queue)
    return None


def _binds(queue: Any, exchange: str, routing_key: str) -> bool:
    """Whether ``queue``'s binding takes ``routing_key``, matched the way kombu does.

    A queue passed with a routing key its binding does not take is not where the
    message goes: stamping it would send restores to the wrong queue.
    """
    from kombu.transport.virtual.exchange import STANDARD_EXCHANGE_TYPES

    kind: Any = STANDARD_EXCHANGE_TYPES.get(getattr(queue.exchange, "type", None) or "direct")
    if kind is None:  # e.g. a headers exchange: kombu's Redis transport cannot route it
        return False
    matcher: Any = kind(None)
    entry = matcher.prepare_bind(queue.name, exchange, queue.routing_key or "", {})
    return bool(matcher.lookup([entry], exchange, routing_key, None))


def _priority(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def stamp(
    headers: dict[str, Any],
    exchange: Any,
    routing_key: Any,
    declare: Iterable[Any] | None,
    properties: Mapping[str, Any],
) -> bool:
    """Write the origin headers into ``headers`` unless any is there; True if written."""
    if any(name in headers for name in HEADERS):
        return False
    headers.update(origin_of(exchange, routing_key, declare, properties).headers())
    return True


def _stamp_before_publish(
    sender: Any = None,
    headers: dict[str, Any] | None = None,
    exchange: Any = None,
    routing_key: Any = None,
    declare: Any = None,
    properties: Mapping[str, Any] | None = None,
    **_: Any,
) -> None:
    if headers is not None and _options() is not None:
        stamp(headers, exchange, routing_key, declare, properties or {})


_malformed_warned = threading.Event()


def origin_from_headers(headers: Mapping[str, Any] | None) -> Origin | None:
    """The stamp in ``headers``; None when there is none or it is malformed.

    A malformed stamp (some headers missing, wrong types) logs one warning per process:
    the message is then treated as unstamped (kombu routes it; quarantine if it would
    drop it) and its retries are not pinned.
    """
    if not headers or not any(name in headers for name in HEADERS):
        return None
    origin = _parse(headers)
    if origin is None and not _malformed_warned.is_set():
        _malformed_warned.set()
        logger.warning(
            "resilience: ignoring a malformed routing stamp %r (task %s); such messages "
            "are treated as unstamped. Logged once per process.",
            {name: headers.get(name) for name in HEADERS}, headers.get("id"),
        )  # fmt: skip
    return origin


def _parse(headers: Mapping[str, Any]) -> Origin | None:
    queue, exchange, routing_key, priority = (headers.get(name) for name in HEADERS)
    if not all(name in headers for name in HEADERS):
        return None
    if not (queue is None or (isinstance(queue, str) and queue)):
        return None
    if not (isinstance(exchange, str) and isinstance(routing_key, str)):
        return None
    if priority is not None and not _valid_priority(priority):
        return None
    return Origin(queue, exchange, routing_key, priority)


def _valid_priority(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_PRIORITY


# -- retry pinning ----------------------------------------------------------------------------


def retry_options(request: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``Task.retry`` options that send the retry to the request's stamped origin.

    Options the caller gave win. A caller who picks another destination also drops the
    stamp from the retry's headers, so the retry is stamped with its new destination.
    """
    origin = origin_from_headers(getattr(request, "headers", None))
    if origin is None or _options() is None:
        return options
    if any(options.get(name) is not None for name in _ROUTING_OPTIONS):
        return _restamped(request, options)
    pinned = dict(options)
    if origin.exchange == "" and origin.queue:
        pinned["queue"] = origin.queue
    elif origin.exchange:
        pinned.update(exchange=origin.exchange, routing_key=origin.routing_key)
    if origin.priority is not None and options.get("priority") is None:
        pinned["priority"] = origin.priority
    return pinned


def _restamped(request: Any, options: dict[str, Any]) -> dict[str, Any]:
    if "headers" in options:
        return options
    headers = {k: v for k, v in (request.headers or {}).items() if k not in HEADERS}
    return dict(options, headers=headers)


# -- the restore guard ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Reroute:
    queue: str
    priority: int
    key: str  # the Redis list the message goes to
    original: list[str]  # the lists kombu would have used ([]: it would drop the message)
    reason: str  # "origin" or "quarantine"


def _destination(
    channel: Any, payload: dict[str, Any], exchange: str, routing_key: str, vanilla_pri: bool
) -> _Reroute | None:
    """Where the guard sends a restored message; None: leave it to kombu."""
    options = _options()
    if options is None:
        return None
    origin = origin_from_headers(payload.get("headers"))
    original = _kombu_keys(channel, payload, exchange, routing_key, vanilla_pri)
    if origin is not None and origin.queue:
        pri = _clamped(channel, payload, origin.priority)
        return _Reroute(
            origin.queue, pri, channel._q_for_pri(origin.queue, pri), original, "origin"
        )
    if original:
        return None
    # Quarantine is inspected by hand: one list (the bare key), whatever the priority.
    pri = _clamped(channel, payload, None)
    queue = options.quarantine_queue
    return _Reroute(queue, pri, queue, original, "quarantine")


def _kombu_keys(
    channel: Any, payload: dict[str, Any], exchange: str, routing_key: str, vanilla_pri: bool
) -> list[str]:
    """The lists kombu's own ``_do_restore_message`` pushes this message to."""
    queues = [queue for queue in channel._lookup(exchange, routing_key) if queue]
    if not vanilla_pri:  # kombu <= 5.3: the bare key
        return queues
    pri = channel._get_message_priority(payload, reverse=False)
    return [channel._q_for_pri(queue, pri) for queue in queues]


def _clamped(channel: Any, payload: dict[str, Any], priority: int | None) -> int:
    # kombu's own clamp (0-9, default when missing), exactly as at publish time.
    if priority is None:
        return int(channel._get_message_priority(payload, reverse=False))
    return int(channel._get_message_priority({"properties": {"priority": priority}}, reverse=False))


def _push(pipe: Any, payload: dict[str, Any], key: str, leftmost: bool) -> None:
    from kombu.utils.json import dumps

    to_json = cast("Callable[[Any], str]", dumps)  # kombu ships no annotations
    # kombu's own marking (a KeyError there means a non-Celery payload: left unmarked).
    try:
        payload["headers"]["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True
    except (KeyError, TypeError):
        pass
    # kombu's placement: rpush puts it at the end BRPOP reads next (the head of the queue).
    (pipe.lpush if leftmost else pipe.rpush)(key, to_json(payload))


def _report(channel: Any, payload: dict[str, Any], to: _Reroute) -> None:
    if to.key in to.original:
        return
    headers = payload.get("headers") or {}
    if to.reason == "quarantine":
        logger.warning(
            "resilience: restored message %s (%s) matches no queue; kombu would drop it: "
            "moved to quarantine queue %r",
            headers.get("id"), headers.get("task"), to.queue,
        )  # fmt: skip
    else:
        logger.debug(
            "resilience: restored message %s to its origin %r priority %d (kombu: %r)",
            headers.get("id"), to.queue, to.priority, to.original,
        )  # fmt: skip
    signals.send(
        signals.message_rerouted, channel,
        queue=to.queue, priority=to.priority, original=to.original, reason=to.reason,
        task_id=headers.get("id"),
    )  # fmt: skip


def _guarded(original: Callable[..., Any]) -> Callable[..., Any]:
    # Every restore path (shutdown, reject(requeue=True), the visibility sweep) ends in
    # kombu's Channel._do_restore_message, called inside the MULTI/EXEC that also removes
    # the message from the unacked hash. Choosing the list here keeps that atomicity,
    # kombu's head-of-queue placement and its redelivered flag; there is no public hook.
    code = getattr(original, "__code__", None)
    vanilla_pri = code is None or "_q_for_pri" in code.co_names  # kombu >= 5.4

    def _do_restore_message(
        self: Any, payload: Any, exchange: Any, routing_key: Any, pipe: Any, leftmost: bool = False
    ) -> Any:
        try:
            to = _destination(self, payload, exchange, routing_key, vanilla_pri)
        except self.connection_errors:
            raise  # as kombu 5.7 does: aborts the transaction, the message stays unacked
        except Exception:
            logger.exception("resilience: restore guard failed; kombu restores the message")
            to = None
        if to is None:
            return original(self, payload, exchange, routing_key, pipe, leftmost)
        _push(pipe, payload, to.key, leftmost)
        # Note: redis-py re-runs the transaction after a WATCH conflict, so this may repeat.
        _report(self, payload, to)
        return None

    _do_restore_message.__wrapped__ = original  # type: ignore[attr-defined]
    return _do_restore_message


# -- enable / disable -------------------------------------------------------------------------

_Provider = Callable[[], Optional[RoutingOptions]]
_provider: _Provider | None = None
_provider_warned = threading.Event()
_originals: dict[Any, Any] = {}


def _options() -> RoutingOptions | None:
    try:
        return _provider() if _provider is not None else None
    except Exception:  # a bad setting must not break a publish or a restore
        if not _provider_warned.is_set():
            _provider_warned.set()
            logger.exception("resilience: routing settings unavailable; routing is off")
        return None


def _channel_class() -> Any:
    from kombu.transport.redis import Channel

    return Channel


def enable(provider: _Provider) -> None:
    """Stamp every published task and guard kombu's Redis restores, process-wide.

    ``provider`` is called per publish and per restore (cheap: settings are cached) and
    may return None to turn routing off. Calling ``enable`` again only replaces it.
    """
    global _provider
    _provider = provider
    before_task_publish.connect(_stamp_before_publish, weak=False, dispatch_uid=_DISPATCH_UID)
    channel = _channel_class()
    original = channel.__dict__.get("_do_restore_message")
    if original is None:  # a kombu this module does not know: leave it alone, say so
        logger.warning("resilience: kombu's Redis Channel has no _do_restore_message; "
                       "restored messages are routed by kombu alone")  # fmt: skip
    elif channel not in _originals:
        _originals[channel] = original
        channel._do_restore_message = _guarded(original)


def disable() -> None:
    """Undo :func:`enable` (tests; a process that wants kombu untouched)."""
    global _provider
    _provider = None
    before_task_publish.disconnect(_stamp_before_publish, dispatch_uid=_DISPATCH_UID)
    for channel, original in _originals.items():
        channel._do_restore_message = original
    _originals.clear()


def enabled() -> bool:
    return bool(_originals)


def install_routing(app: Any) -> None:
    """Stamp, pin and guard for ``app``; settings are read lazily, at first use."""
    enable(lambda: options_from(settings_for(app)))
