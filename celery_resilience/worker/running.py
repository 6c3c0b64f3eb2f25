"""What this worker runs now, read from Celery's worker state (main process only).

A message whose task still runs must not go back to its queue when its channel closes:
Celery acks it when the task finishes (the kept connection info makes that ack work on a
new connection). These functions tell such messages apart.
"""

from __future__ import annotations

from typing import Any


def running() -> dict[str, Any]:
    """Delivery tag -> Celery request, for every task handed to this worker's pool."""
    from celery.worker import state

    requests = snapshot(state.active_requests) + snapshot(state.reserved_requests)
    active = set(map(id, snapshot(state.active_requests)))
    out = {}
    for request in requests:
        if id(request) in active or getattr(request, "_apply_result", None) is not None:
            tag = getattr(getattr(request, "_message", None), "delivery_tag", None)
            if tag is not None:
                out[str(tag)] = request
    return out


def still_running(request_ref: Any) -> bool:
    """Whether the pool still runs this request (a weakref) and will report back on it.

    Then Celery acks (or rejects) its message when the result comes in. A job the pool no
    longer tracks brings no ack.
    """
    request = request_ref() if request_ref is not None else None
    if request is None or getattr(request, "acknowledged", False):
        return False
    ref = getattr(request, "_apply_result", None)
    job = ref() if ref is not None else None
    table = getattr(job, "_cache", None)
    if table is not None:  # a billiard (prefork) job: tracked while in the pool's table
        return table.get(getattr(job, "_job", None)) is job
    from celery.worker import state  # other pools: active until the task is done

    return any(other is request for other in snapshot(state.active_requests))


def snapshot(items: Any) -> list[Any]:
    """``list(items)`` of a set another thread changes meanwhile."""
    for _ in range(10):
        try:
            return list(items)
        except RuntimeError:  # changed size during iteration
            continue
    return []


def terminating() -> bool:
    """A cold shutdown: the pool is killed, nothing runs any more."""
    from celery.worker import state

    return state.should_terminate not in (None, False)


def stopping() -> bool:
    """A warm or cold shutdown is under way."""
    from celery.worker import state

    return terminating() or state.should_stop not in (None, False)
