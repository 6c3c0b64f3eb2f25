"""Settings: the ``resilience_*`` keys of ``app.conf``, read once into a frozen dataclass.

Keys are lowercase and read with ``conf.get(key, default)``; a Django project using
``config_from_object("django.conf:settings", namespace="CELERY")`` sets them as
``CELERY_RESILIENCE_*``. They are deliberately *not* registered with
``app.add_defaults()``: on Celery 5.7 those defaults shadow the Django-style names.

The dataclass defaults below *are* the documented defaults (README, "Settings").
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable
from typing import Any, Callable

from .errors import ConfigurationError

PREFIX = "resilience_"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated plugin settings. Build with :meth:`from_conf`; every field is a key."""

    # Tier 1: re-run the body in the worker process while the message stays unacked.
    # 10 s rides out a connection reset or a short Redis restart without a re-publish.
    inprocess_budget: float = 10.0
    # First in-process wait; doubles per attempt (full jitter), never above the cap.
    inprocess_backoff: float = 0.1
    inprocess_backoff_max: float = 2.0
    # Tier 2: Celery retries. Base and cap of the exponential backoff, in seconds.
    retry_backoff: float = 1.0
    retry_backoff_max: float = 30.0
    retry_jitter: bool = True
    max_retries: int = 5
    # How long a failed retry publish is retried before the message is handed back.
    publish_budget: float = 10.0
    # Extra classes (or "module:Name" / "module.Name" paths) for the classifier.
    transient_errors: tuple[type[BaseException], ...] = ()
    terminal_errors: tuple[type[BaseException], ...] = ()
    # Keepalive on every Redis socket. Seed 000's values: the first probe after 60 s
    # idle, well inside a 3600 s firewall idle timeout; a dead peer is found in
    # 60 + 10 * 9 = 150 s.
    keepalive: bool = True
    keepalive_idle: int = 60
    keepalive_interval: int = 10
    keepalive_count: int = 9
    # TCP_USER_TIMEOUT in seconds; None: idle + interval * count, so unacknowledged
    # writes give up when keepalive would. 0 leaves the kernel default.
    keepalive_user_timeout: int | None = None
    # Reconnect, before writing, a pooled connection whose socket the kernel closed
    # (what keepalive does to a dead path); without it the first write fails.
    keepalive_heal: bool = True
    # Stamp every task message with its origin (queue, exchange/routing key, priority);
    # retries and messages kombu restores go back there (seed 002).
    routing: bool = True
    # Where a restored message goes when no queue can be worked out for it (kombu would
    # drop it). Nothing consumes it unless a worker is started with -Q for it.
    quarantine_queue: str = "resilience.quarantine"
    # Atomic fetch: a message moves from its queue into kombu's unacked hash in one step,
    # so a connection that breaks mid-fetch loses nothing.
    fetch: bool = True
    # An idle fetch waits this long on the most urgent list of the last message's queue;
    # a message on another list (queue or priority) is seen at most this late. 0.2 s:
    # 5 polls/s idle.
    fetch_wait: float = 0.2
    # The reclaimer's period: heartbeat, lease renewal, putting back what a lost
    # connection left behind (within two periods of Redis answering again).
    fetch_heartbeat: float = 2.0
    # A worker silent this long is dead: its in-flight messages are restored. Long enough
    # for a GC pause or a slow host; 15 missed heartbeats.
    fetch_orphan_timeout: float = 30.0
    # Keep the garbage collector from walking a held backlog in the worker's main process
    # (with 10 000 ETA tasks held, full collections take 100-300 ms): freeze what is
    # alive (gc.freeze) after every gc_freeze_every ETA/countdown tasks taken in (0: never)
    # and after any full collection of gc_freeze_after seconds or more. Undone when the
    # ETA backlog halves, the consumer stops, or after 10 minutes (heap.py). A worker
    # that takes in no ETA tasks and whose collections stay short is never frozen.
    gc_freeze: bool = True
    gc_freeze_every: int = 500
    gc_freeze_after: float = 0.01

    @classmethod
    def from_conf(cls, conf: Any) -> Settings:
        """Read and validate every ``resilience_*`` key; raise :class:`ConfigurationError`."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            key = PREFIX + field.name
            raw = conf.get(key, None)
            if raw is not None:
                values[field.name] = _PARSERS[field.name](key, raw)
        settings = cls(**values)
        settings._check_relations()
        return settings

    def _check_relations(self) -> None:
        if self.inprocess_backoff_max < self.inprocess_backoff:
            raise ConfigurationError(
                PREFIX + "inprocess_backoff_max",
                self.inprocess_backoff_max,
                f"must be >= resilience_inprocess_backoff ({self.inprocess_backoff})",
            )
        if self.fetch_orphan_timeout < 3 * self.fetch_heartbeat:
            raise ConfigurationError(
                PREFIX + "fetch_orphan_timeout",
                self.fetch_orphan_timeout,
                f"must be >= 3 x resilience_fetch_heartbeat ({self.fetch_heartbeat})",
            )
        if self.retry_backoff_max < self.retry_backoff:
            raise ConfigurationError(
                PREFIX + "retry_backoff_max",
                self.retry_backoff_max,
                f"must be >= resilience_retry_backoff ({self.retry_backoff})",
            )


def settings_for(app: Any) -> Settings:
    """The app's settings, read and validated now (callers keep what they need)."""
    return Settings.from_conf(app.conf)


def number(key: str, raw: Any, *, minimum: float, maximum: float, integer: bool = False) -> Any:
    """Parse a number in ``[minimum, maximum]``; strings from env files are accepted."""
    if isinstance(raw, bool):
        raise ConfigurationError(key, raw, "must be a number, not a boolean")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigurationError(key, raw, "must be a number") from None
    if integer and value != int(value):
        raise ConfigurationError(key, raw, "must be a whole number")
    if not minimum <= value <= maximum:
        raise ConfigurationError(key, raw, f"must be between {minimum:g} and {maximum:g}")
    return int(value) if integer else value


def boolean(key: str, raw: Any) -> bool:
    """Parse a bool; ``"true"``/``"off"``-style strings are accepted."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ConfigurationError(key, raw, "must be true or false")


def queue_name(key: str, raw: Any) -> str:
    """Parse a queue name: a non-empty string without surrounding whitespace."""
    if not isinstance(raw, str) or not raw or raw != raw.strip():
        raise ConfigurationError(key, raw, "must be a non-empty queue name without spaces")
    return raw


def exception_classes(key: str, raw: Any) -> tuple[type[BaseException], ...]:
    """Parse exception classes given as classes or ``"pkg.mod:Name"`` / ``"pkg.mod.Name"``."""
    items: Iterable[Any] = [raw] if isinstance(raw, (str, type)) else raw
    try:
        return tuple(_exception_class(key, item) for item in items)
    except TypeError:
        raise ConfigurationError(key, raw, "must be a list of exception classes") from None


def _exception_class(key: str, item: Any) -> type[BaseException]:
    if isinstance(item, str):
        module, _, name = item.replace(":", ".").rpartition(".")
        try:
            item = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            raise ConfigurationError(key, item, "names no importable exception class") from None
    if not (isinstance(item, type) and issubclass(item, BaseException)):
        raise ConfigurationError(key, item, "must be an exception class")
    return item


def _seconds(maximum: float, minimum: float = 0.0) -> Callable[[str, Any], Any]:
    return lambda key, raw: number(key, raw, minimum=minimum, maximum=maximum)


def _whole(minimum: int, maximum: int) -> Callable[[str, Any], Any]:
    return lambda key, raw: number(key, raw, minimum=minimum, maximum=maximum, integer=True)


# One parser per field. Ranges reject the absurd, not the unusual: a day of backoff is
# allowed, a negative one is not.
_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "inprocess_budget": _seconds(600),
    "inprocess_backoff": _seconds(60, minimum=0.001),
    "inprocess_backoff_max": _seconds(600, minimum=0.001),
    "retry_backoff": _seconds(86400, minimum=0.001),
    "retry_backoff_max": _seconds(86400, minimum=0.001),
    "retry_jitter": boolean,
    "max_retries": _whole(0, 10_000),
    "publish_budget": _seconds(600),
    "transient_errors": exception_classes,
    "terminal_errors": exception_classes,
    "keepalive": boolean,
    # Idle must stay below the 3600 s idle timeout of typical cloud firewalls.
    "keepalive_idle": _whole(1, 3599),
    "keepalive_interval": _whole(1, 600),
    "keepalive_count": _whole(1, 100),
    "keepalive_user_timeout": _whole(0, 86400),
    "keepalive_heal": boolean,
    "routing": boolean,
    "quarantine_queue": queue_name,
    "fetch": boolean,
    "fetch_wait": _seconds(10, minimum=0.01),
    "fetch_heartbeat": _seconds(60, minimum=0.1),
    "fetch_orphan_timeout": _seconds(86400, minimum=1),
    "gc_freeze": boolean,
    "gc_freeze_every": _whole(0, 1_000_000),
    "gc_freeze_after": _seconds(10),
}
