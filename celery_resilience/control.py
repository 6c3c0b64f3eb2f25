"""``celery -A proj inspect resilience_sockets``: each worker's keepalive audit.

Celery 5.3's CLI only knows its built-in inspect commands; there (and anywhere) use
``python -m celery_resilience.control -A proj`` instead, which prints the same JSON.

The command runs in the worker's main process. It reports the main process's Redis
sockets (from redis-py's connection objects) and, where the kernel allows it
(Linux >= 5.6, same user or root), each pool child's sockets whose peer is one of the
Redis endpoints the main process knows, read back with ``pidfd_getfd``.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from . import keepalive

NAME = "resilience_sockets"


def resilience_sockets(state: Any, **kwargs: Any) -> dict[str, Any]:
    """The audit of this worker: ``{"main": [...], "children": {pid: [...]}, "summary"}``."""
    main = keepalive.audit()
    peers = {entry["peer"] for entry in main} | _configured_endpoints(state.app)
    children = {str(pid): keepalive.audit_process(pid, peers) for pid in _child_pids(state)}
    every = main + [entry for entries in children.values() for entry in entries]
    covered = sum(1 for entry in every if entry.get("keepalive") == 1)
    return {
        "main": main,
        "children": children,
        "summary": f"keepalive on {covered}/{len(every)} redis sockets",
    }


def _child_pids(state: Any) -> list[int]:
    pool = getattr(state.consumer, "pool", None)
    try:
        processes = pool.info.get("processes", []) if pool is not None else []
    except Exception:  # a pool without info (solo, threads): no children
        return []
    # The solo pool reports the main process itself.
    return [int(pid) for pid in processes if int(pid) != os.getpid()]


def _configured_endpoints(app: Any) -> set[str]:
    """``":port"`` of the Redis URLs in the app's broker and backend settings."""
    endpoints = set()
    for url in (app.conf.broker_url, app.conf.result_backend):
        if isinstance(url, str) and url.startswith(("redis", "rediss")):
            port = urlsplit(url.split(";")[0]).port or 6379
            endpoints.add(f":{port}")
    return endpoints


def register() -> None:
    """Add the inspect command to Celery's control panel (once per process)."""
    from celery.worker.control import Panel, inspect_command

    if NAME not in Panel.data:
        inspect_command(name=NAME)(resilience_sockets)


def main(argv: list[str] | None = None) -> int:
    """``python -m celery_resilience.control -A proj [--timeout 5]``: the audit as JSON."""
    import argparse
    import json

    from celery.utils.imports import symbol_by_name

    parser = argparse.ArgumentParser(prog="python -m celery_resilience.control")
    parser.add_argument("-A", "--app", required=True, help="the Celery app, as for celery -A")
    parser.add_argument("--timeout", type=float, default=5.0)
    opts = parser.parse_args(argv)
    app = symbol_by_name(opts.app if ":" in opts.app else opts.app + ":app")
    replies = app.control.broadcast(NAME, reply=True, timeout=opts.timeout)
    print(json.dumps({k: v for reply in replies for k, v in reply.items()}, indent=2))
    return 0 if replies else 1


if __name__ == "__main__":
    raise SystemExit(main())
