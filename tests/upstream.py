"""What the installed Python, Celery, kombu and redis-py do, where the tests' expectations depend on it.

Each flag is a behaviour measured on real servers, with the versions it holds for. A control
arm asserts the bug only where the flag says upstream still has it; a new upstream release
that changes a behaviour shows up as a failing test (run ``scripts/test latest``), and the
flag is then corrected here, once, with the new measurement.
"""

from __future__ import annotations

import sys

import celery
import kombu
import redis

REDIS_PY = tuple(int(part) for part in redis.__version__.split(".")[:2])

#: Python >= 3.10: ``socket.timeout`` is ``TimeoutError``, so an ``OSError(ETIMEDOUT)`` (a
#: socket keepalive aborted) is caught by redis-py's ``except socket.timeout`` and read as
#: "slow", not "dead". On 3.9 it is an ``OSError`` and becomes a redis ``ConnectionError``.
SOCKET_TIMEOUT_IS_TIMEOUTERROR = sys.version_info >= (3, 10)

#: redis-py >= 8.2 tells an OS-level ETIMEDOUT from its own timeouts (``is_os_level_timeout``):
#: a pooled connection whose socket keepalive aborted fails the pool's checkout check and is
#: reconnected before any command is sent. Before 8.2 that holds on Python 3.9 only (above).
#: Measured: tests/integration/test_firewall.py, redis-py 4.6-8.1 (Python 3.10-3.13: the
#: first write fails) and 8.2.0 (reconnected at checkout).
REDIS_POOL_RECONNECTS_ABORTED_SOCKETS = REDIS_PY >= (8, 2) or not SOCKET_TIMEOUT_IS_TIMEOUTERROR

#: What a write on a socket keepalive aborted raises, before anything reconnects it: redis-py
#: < 8.2 on Python >= 3.10 reads the OS's ETIMEDOUT as its own timeout.
REDIS_ABORTED_WRITE_ERROR = (
    "TimeoutError" if SOCKET_TIMEOUT_IS_TIMEOUTERROR and REDIS_PY < (8, 2) else "ConnectionError"
)

#: kombu <= 5.3.x restores every message to the bare key, whatever its priority (fixed in
#: kombu 5.4.0, PR #2026).
KOMBU_RESTORE_DROPS_PRIORITY = kombu.VERSION < (5, 4)

#: Celery >= 5.7 closes the collected connection, which restores through a transport whose
#: client is gone: "Unrecoverable error: AttributeError: 'NoneType' ... 'hostname'".
CELERY_CLOSES_COLLECTED = celery.VERSION >= (5, 7)

#: Celery >= 5.7's ``AsynPool.flush`` (on a lost connection) keeps the jobs children have
#: accepted; older ones forget every job. Both forget jobs written but not yet accepted.
CELERY_FLUSH_KEEPS_ACCEPTED_JOBS = celery.VERSION >= (5, 7)

#: Celery >= 5.4's CLI runs inspect commands a package registers; 5.3 knows only its own.
CELERY_CLI_RUNS_CUSTOM_INSPECT = celery.VERSION >= (5, 4)
