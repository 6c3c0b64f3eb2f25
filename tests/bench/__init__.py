"""Test bench for celery-resilience: real redis-server processes, fault injection, workers.

Everything started here dies with the test session: children carry
PR_SET_PDEATHSIG=SIGKILL, and :func:`stop_all` (called at session finish and at exit)
stops whatever is still registered.
"""

from __future__ import annotations

from ._proc import group_members, live_objects, pid_alive, stop_all, tail
from .proxy import ResetProxy
from .redis_server import (
    ExternalRedis,
    RedisServer,
    RedisServerError,
    RestartUnsupported,
    free_port,
    have_redis_server_binary,
    no_retry_client,
    raw_command,
    redis_server_binary,
    session_redis_url,
)
from .workers import PreforkWorker, inprocess_worker

__all__ = [
    "ExternalRedis",
    "PreforkWorker",
    "RedisServer",
    "RedisServerError",
    "ResetProxy",
    "RestartUnsupported",
    "free_port",
    "group_members",
    "have_redis_server_binary",
    "inprocess_worker",
    "live_objects",
    "no_retry_client",
    "pid_alive",
    "raw_command",
    "redis_server_binary",
    "session_redis_url",
    "stop_all",
    "tail",
]
