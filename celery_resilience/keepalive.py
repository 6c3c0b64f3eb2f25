"""TCP keepalive on every Redis connection this process opens.

redis-py < 8 sets no SO_KEEPALIVE; redis-py 8 does, but kombu passes
``socket_keepalive=None`` explicitly, the result backend only has a boolean, and
django-redis has no option of its own. A host-level sysctl does not help: the kernel
only probes sockets that opted in. So the plugin opts every socket in, whatever each
library asked for. The code lives in :mod:`celery_resilience.sockets`; this module is
its public face (``celery_resilience.keepalive.audit()``).
"""

from __future__ import annotations

from .sockets.audit import audit, audit_process, sweep
from .sockets.hooks import disable, enable, enabled
from .sockets.options import KeepaliveOptions, apply, options_from, read_options

__all__ = [
    "KeepaliveOptions",
    "apply",
    "audit",
    "audit_process",
    "disable",
    "enable",
    "enabled",
    "options_from",
    "read_options",
    "sweep",
]
