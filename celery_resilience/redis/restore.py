"""Restores: where a message handed back to Redis goes, and one log line saying why.

kombu hands a message back (a closing channel, ``reject(requeue=True)``, its
visibility-timeout sweep) inside one MULTI/EXEC that also removes its ``unacked`` record,
and re-derives its list from the exchange and routing key. Where that goes wrong
(kombu <= 5.3 drops the priority: every message lands in the list polled first; an
exchange the restoring process never declared resolves to no queue, and the message is
lost), the origin stamp (:mod:`celery_resilience.routing`) says where it belongs:

- a stamped message goes to its stamped queue's list for its stamped priority;
- an unstamped one goes where kombu would send it;
- one kombu would drop goes to ``resilience_quarantine_queue``.

kombu's head-of-list placement and ``redelivered`` flag are kept. After the transaction,
each restored message gets one INFO line naming its task and the reason, and the
``message_restored`` signal (``message_rerouted`` too where kombu would have chosen
otherwise).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Callable, cast

import kombu
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from .. import routing, signals

logger = logging.getLogger(__name__)

#: Why a message went back to its queue (the ``reason`` of ``message_restored``).
SHUTDOWN = "shutdown"  # the worker stopped while holding it
CONNECTION_LOST = "connection lost"  # the channel that took it is gone
LOST_FETCH_REPLY = "lost fetch reply"  # recorded by a fetch whose reply never arrived
DEAD_WORKER = "dead worker"  # the worker that took it stopped heartbeating
REJECTED = "rejected"  # reject(requeue=True)
VISIBILITY_TIMEOUT = "visibility timeout"  # kombu's sweep
FROM_MEMORY = "copy from memory"  # Redis lost its record: the worker's copy went back

#: kombu >= 5.4 restores to the message's priority list (PR #2026); older, the bare key.
_KOMBU_KEEPS_PRIORITY = tuple(kombu.VERSION[:2]) >= (5, 4)


@dataclasses.dataclass(frozen=True)
class Destination:
    queue: str
    priority: int
    key: str  # the Redis list


@dataclasses.dataclass(frozen=True)
class Restored:
    """Where one restore sent a message, and where kombu alone would have."""

    destinations: list[Destination]
    kombu_keys: list[str]
    how: str  # "origin", "kombu" or "quarantine"


def text(raw: Any) -> str:
    """A delivery tag or key as text, whether redis-py gave bytes or kombu a str."""
    return str(cast("Callable[[Any], str]", bytes_to_str)(raw))  # kombu ships no annotations


def decoded(raw: Any) -> Any:
    """kombu's JSON of a Redis reply (bytes or str), decoded as kombu decodes it."""
    return cast("Callable[[str], Any]", loads)(text(raw))


def choose(channel: Any, payload: Any, exchange: str, routing_key: str) -> Restored:
    """Where ``channel`` sends a restored ``payload`` (see the module doc)."""
    kombu = _kombu_destinations(channel, payload, exchange, routing_key)
    kombu_keys = [to.key for to in kombu]
    quarantine = channel.restore_quarantine()  # None: routing is off
    origin = None if quarantine is None else routing.origin_from_headers(_headers(payload))
    if origin is not None and origin.queue:
        pri = _clamped(channel, origin.priority, payload)
        to = Destination(origin.queue, pri, channel._q_for_pri(origin.queue, pri))
        return Restored([to], kombu_keys, "origin")
    if kombu or quarantine is None:
        return Restored(kombu, kombu_keys, "kombu")
    # Quarantine is looked at by hand: one list (the bare key), whatever the priority.
    pri = _clamped(channel, None, payload)
    return Restored([Destination(quarantine, pri, quarantine)], kombu_keys, "quarantine")


def _kombu_destinations(
    channel: Any, payload: Any, exchange: str, routing_key: str
) -> list[Destination]:
    pri = _clamped(channel, None, payload)
    queues = [queue for queue in channel._lookup(exchange, routing_key) if queue]
    if _KOMBU_KEEPS_PRIORITY:
        return [Destination(q, pri, channel._q_for_pri(q, pri)) for q in queues]
    return [Destination(q, pri, q) for q in queues]


def _clamped(channel: Any, priority: int | None, payload: Any) -> int:
    # kombu's own clamp (0-9; its default when missing), as at publish time.
    if priority is not None:
        payload = {"properties": {"priority": priority}}
    return int(channel._get_message_priority(payload, reverse=False))


def _headers(payload: Any) -> Any:
    return payload.get("headers") if isinstance(payload, dict) else None


def push(pipe: Any, payload: Any, restored: Restored, leftmost: bool) -> None:
    """Queue ``payload``'s pushes on ``pipe``, marked redelivered as kombu marks it."""
    try:
        payload["headers"]["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True
    except (KeyError, TypeError):  # not a Celery payload: left unmarked, as kombu does
        pass
    raw = cast("Callable[[Any], str]", dumps)(payload)
    for to in restored.destinations:
        # kombu's placement: rpush puts it at the end BRPOP reads next (the queue's head).
        (pipe.lpush if leftmost else pipe.rpush)(to.key, raw)


def restore(
    qos: Any,
    tag: str,
    client: Any,
    *,
    reason: str,
    leftmost: bool = False,
    message: Any = None,
    lost: bool = False,
) -> Restored | None:
    """Put message ``tag`` back in its queue in one transaction, as kombu's ``restore_by_tag``.

    If Redis no longer records it and ``lost`` (Redis lost data since it was fetched),
    ``message`` (the worker's in-memory copy) is pushed back instead. None: nothing to
    restore (acked, or restored by someone else already).
    """
    channel = qos.channel
    outcome: list[tuple[Any, Restored, str]] = []

    def transaction(pipe: Any) -> None:
        outcome.clear()  # redis-py runs this again after a WATCH conflict
        record = pipe.hget(qos.unacked_key, tag)
        pipe.multi()
        qos._remove_from_indices(tag, pipe)
        why = reason
        if record:
            payload, exchange, routing_key = decoded(record)
        elif lost and message is not None:
            info = message.delivery_info or {}
            payload, exchange, routing_key, why = (
                copy.deepcopy(message._raw), info.get("exchange"), info.get("routing_key"),
                FROM_MEMORY,
            )  # fmt: skip
        else:
            return
        restored = choose(channel, payload, exchange, routing_key)
        push(pipe, payload, restored, leftmost)
        outcome.append((payload, restored, why))

    client.transaction(transaction, qos.unacked_key)
    if not outcome:
        return None
    payload, restored, why = outcome[0]
    report(channel, tag, payload, restored, why)
    return restored


def report(channel: Any, tag: str, payload: Any, restored: Restored, reason: str) -> None:
    """One log line per restored message, and the signals."""
    headers = _headers(payload) or {}
    task_id, task = headers.get("id"), headers.get("task")
    if not restored.destinations:
        logger.warning("resilience: message %s (task %s %s) matches no queue and is dropped, "
                       "as kombu drops it (routing is off): %s", tag, task, task_id, reason)  # fmt: skip
    level = logging.WARNING if restored.how == "quarantine" else logging.INFO
    for to in restored.destinations:
        logger.log(level, "resilience: restored message %s (task %s %s) to %s%s priority %d: %s",
                   tag, task, task_id, "the quarantine queue " if level > logging.INFO else "",
                   to.queue, to.priority, reason)  # fmt: skip
        signals.send(signals.message_restored, channel, task_id=task_id, queue=to.queue,
                     priority=to.priority, reason=reason)  # fmt: skip
        if to.key not in restored.kombu_keys:
            signals.send(
                signals.message_rerouted, channel, queue=to.queue, priority=to.priority,
                original=restored.kombu_keys, reason=restored.how, task_id=task_id,
            )  # fmt: skip
