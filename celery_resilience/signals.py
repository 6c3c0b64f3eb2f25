"""Blinker signals sent by celery-resilience.

Every signal lives in a private :class:`blinker.Namespace`, so connecting to them never
touches Celery's own signals. The sender is always the task instance (or, for the
keepalive and routing signals, the object that made the decision). Receivers get keyword
arguments only:

``transient_error``
    A transient error met a :class:`~celery_resilience.ResilientTask`, before the
    decision to retry. kwargs: ``exc`` (the exception raised), ``cause`` (the transient
    exception found in its ``__cause__``/``__context__`` chain), ``attempt`` (1 for the
    first error of this delivery), ``tier`` (``"inprocess"`` or ``"celery"``: which tier
    handles it), ``task_id``, ``args``, ``kwargs``.
``retry_scheduled``
    A Celery retry was published. kwargs: ``exc``, ``countdown`` (seconds),
    ``retries`` (the number the new message carries), ``queue``, ``priority``, ``task_id``.
``retries_exhausted``
    The retry limit ran out; the task fails with ``exc``. kwargs: ``exc``, ``retries``,
    ``task_id``, ``args``, ``kwargs``.
``retry_publish_failed``
    Publishing a retry failed; the original message is kept and handed back to the
    broker instead. kwargs: ``exc`` (the publish error), ``task_id``, ``requeued`` (bool).
``keepalive_applied``
    Keepalive options were applied to sockets. kwargs: ``sockets`` (how many), ``total``.
``message_restored``
    A message went back to its queue. The sender is the plugin's Redis channel. kwargs:
    ``task_id``, ``queue`` and ``priority`` (whose list it went to), ``reason``:
    ``"shutdown"`` (the worker stopped while holding it), ``"connection lost"`` (the
    channel that took it is gone), ``"lost fetch reply"``, ``"dead worker"`` (its worker
    stopped heartbeating), ``"rejected"`` (``reject(requeue=True)``), ``"visibility
    timeout"`` (kombu's sweep) or ``"copy from memory"`` (Redis had lost it; the worker's
    copy went back). Sent once per message, after Redis took it; a worker also logs one
    INFO line per restored message with its task and the reason.
``message_rerouted``
    A restored message was sent to a destination other than the one kombu derived.
    The sender is kombu's Redis channel. kwargs: ``queue`` (where it went),
    ``priority`` (whose list), ``original`` (the Redis lists kombu would have pushed it
    to; ``[]``: kombu would have dropped it), ``reason`` (``"origin"``: its stamp;
    ``"quarantine"``: no destination could be worked out) and ``task_id``. Sent once per
    message, after Redis took it.

:func:`send` is what the package uses to emit: a receiver that raises is logged and
never breaks the task, the worker or the other receivers.
"""

from __future__ import annotations

import logging
from typing import Any

from blinker import NamedSignal, Namespace

logger = logging.getLogger(__name__)

_signals = Namespace()

transient_error: NamedSignal = _signals.signal("transient_error")
retry_scheduled: NamedSignal = _signals.signal("retry_scheduled")
retries_exhausted: NamedSignal = _signals.signal("retries_exhausted")
retry_publish_failed: NamedSignal = _signals.signal("retry_publish_failed")
keepalive_applied: NamedSignal = _signals.signal("keepalive_applied")
message_rerouted: NamedSignal = _signals.signal("message_rerouted")
message_restored: NamedSignal = _signals.signal("message_restored")

__all__ = [
    "keepalive_applied",
    "message_rerouted",
    "message_restored",
    "retries_exhausted",
    "retry_publish_failed",
    "retry_scheduled",
    "send",
    "transient_error",
]


def send(signal: NamedSignal, sender: Any, **kwargs: Any) -> None:
    """Send ``signal`` to each receiver in turn; log, never raise, a receiver's error."""
    if not signal.receivers:
        return
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **kwargs)
        except Exception:
            logger.exception(
                "resilience: receiver %r of signal %r raised; ignored", receiver, signal.name
            )
