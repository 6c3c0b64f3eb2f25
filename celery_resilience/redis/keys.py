"""The Redis keys the plugin writes next to kombu's, and its Lua scripts.

All keys get kombu's ``global_keyprefix`` like kombu's own. ``unacked`` and
``unacked_index`` are kombu's; these are ours:

=============================== ===========================================================
``resilience.owners``           zset: worker owner name -> its last heartbeat (Redis time)
``resilience.inflight.<owner>`` hash: delivery tag -> id of the channel that fetched it
``resilience.recovering.<o>``   a lock while another worker restores dead owner ``o``'s
``resilience.quarantine``       list: what nobody could route (``resilience_quarantine_queue``)
=============================== ===========================================================
"""

from __future__ import annotations

import functools
from importlib import resources

OWNERS = "resilience.owners"
INFLIGHT_PREFIX = "resilience.inflight."
RECOVERING_PREFIX = "resilience.recovering."


def inflight(owner: str) -> str:
    """The in-flight hash of worker ``owner`` (without kombu's key prefix)."""
    return INFLIGHT_PREFIX + owner


@functools.cache
def script(name: str) -> str:
    """The Lua source of ``scripts/<name>.lua``."""
    return (resources.files(__package__) / "scripts" / f"{name}.lua").read_text("utf-8")
