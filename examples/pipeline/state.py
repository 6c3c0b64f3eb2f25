"""Job state in Redis, as in seed 001's AsyncJobStateManager, minus its bug.

Per job and stage: a set of pending image ids, a counter of processed images and the
total. ``update`` removes ids from the pending set and counts only ids that were still
pending, in one Lua script, so a retry after a reset that came *after* Redis applied
the write never counts an image twice.

Transient errors propagate (the caller retries); ``update`` returns None only when the
job's keys are genuinely gone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import redis

STAGES = ("process", "results")

# KEYS: pending set, done counter, total. ARGV: image ids.
# Returns {remaining, done, total} or nil when the job's state is gone.
_UPDATE = """
local total = redis.call('GET', KEYS[3])
if not total then return nil end
local done = 0
for _, id in ipairs(ARGV) do
  if redis.call('SREM', KEYS[1], id) == 1 then
    done = redis.call('INCR', KEYS[2])
  end
end
done = tonumber(redis.call('GET', KEYS[2]) or '0')
return {redis.call('SCARD', KEYS[1]), done, tonumber(total)}
"""

# The control: counts every call, as an INCR-based counter does. A retry after a reset
# that came after the server applied the write counts the image twice.
_UPDATE_COUNTING = """
local total = redis.call('GET', KEYS[3])
if not total then return nil end
for _, id in ipairs(ARGV) do redis.call('SREM', KEYS[1], id) end
local done = redis.call('INCRBY', KEYS[2], #ARGV)
return {redis.call('SCARD', KEYS[1]), done, tonumber(total)}
"""


@dataclass(frozen=True)
class Progress:
    """Where one stage of a job stands."""

    stage: str
    remaining: int
    done: int
    total: int


class JobState:
    """The Redis keys of one job."""

    def __init__(self, client: redis.Redis, job_id: int, *, idempotent: bool = True) -> None:
        self.client = client
        self.job_id = job_id
        self._source = _UPDATE if idempotent else _UPDATE_COUNTING
        self._update = client.register_script(self._source)

    def key(self, *parts: str) -> str:
        return ":".join(("job", str(self.job_id), *parts))

    def create(self, image_ids: Iterable[int]) -> None:
        ids = [str(i) for i in image_ids]
        with self.client.pipeline() as pipe:
            for stage in STAGES:
                pipe.delete(self.key("pending", stage), self.key("done", stage))
                pipe.sadd(self.key("pending", stage), *ids)
            pipe.set(self.key("total"), len(ids))
            pipe.set(self.key("status"), "STARTED")
            pipe.execute()
        # Load the script now, so each update is exactly one EVALSHA (a NOSCRIPT round
        # trip on the first update would make "the N-th state read" ambiguous).
        self.client.script_load(self._source)

    def update(self, image_ids: Iterable[int], stage: str) -> Progress | None:
        """Mark images done in ``stage``; None only when the job's keys are gone."""
        keys = [self.key("pending", stage), self.key("done", stage), self.key("total")]
        raw = self._update(keys=keys, args=[str(i) for i in image_ids])
        if raw is None:
            return None
        remaining, done, total = (int(x) for x in raw)
        return Progress(stage, remaining, done, total)

    def status(self) -> str:
        value = self.client.get(self.key("status"))
        return value.decode() if value else "GONE"

    def set_status(self, status: str) -> None:
        self.client.set(self.key("status"), status)

    def done(self, stage: str) -> int:
        return int(self.client.get(self.key("done", stage)) or 0)

    def wipe(self) -> None:
        """What seed 001's cleanup did on failure: the job's state is deleted."""
        self.client.delete(
            *(self.key(p, s) for p in ("pending", "done") for s in STAGES), self.key("total")
        )
