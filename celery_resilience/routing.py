"""Routing: a task message remembers where it was sent, and goes back there.

Workers hand ETA tasks back to Redis (a shutdown, ``reject(requeue=True)``, kombu's
visibility sweep), and kombu re-derives the list from the exchange and routing key: on
kombu <= 5.3 a low-priority backlog landed in the list polled first, ahead of urgent
work; an exchange the restoring worker never declared loses the message. So:

- **The stamp.** The plugin's channel (:mod:`celery_resilience.redis.channel`) writes a
  task message's destination into four plain headers as it puts it on a list
  (:func:`stamped`), unless the message has them already (a retry copies its request's
  headers, so it keeps the first stamp):

  ================================= ====================================================
  ``resilience_origin_queue``       the queue whose list it went to
  ``resilience_origin_exchange``    the exchange it was published to (``""``: default)
  ``resilience_origin_routing_key`` its routing key
  ``resilience_origin_priority``    its priority (None: the transport's default)
  ================================= ====================================================

- **Retry pinning.** :func:`retry_options` gives ``Task.retry`` the stamped queue and
  priority, so a retry goes back to the origin whatever ``task_routes``, the default
  queue or the queue the message was last taken from (quarantine) say.
- **Restores** use the stamp too (:mod:`celery_resilience.redis.restore`).

Nothing here touches kombu or Celery: it reads and writes headers.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping
from typing import Any

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
    "options_from",
    "origin_from_headers",
    "retry_options",
    "stamped",
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


def _priority(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def stamped(message: Any, queue: str) -> Any:
    """``message`` (kombu's prepared message) with its origin stamped, going to ``queue``.

    Only task messages (a ``task`` header) are stamped, and only when unstamped; the
    message is copied, not changed: kombu puts the same dict on every queue an exchange
    routes it to, and each copy gets its own queue.
    """
    headers = message.get("headers") if isinstance(message, dict) else None
    if not isinstance(headers, dict) or "task" not in headers:
        return message
    if any(name in headers for name in HEADERS):
        return message
    properties = message.get("properties") or {}
    info = properties.get("delivery_info") or {}
    origin = Origin(queue, str(info.get("exchange") or ""), str(info.get("routing_key") or ""),
                    _priority(properties.get("priority")))  # fmt: skip
    return {**message, "headers": {**headers, **origin.headers()}}


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
    if origin is None:
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
