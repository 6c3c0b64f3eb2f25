"""Seed 001 as a small real app: an N-image job whose per-stage progress lives in Redis.

Modules: ``state`` (job state, idempotent writes), ``joblog`` (the job's own log, what a
user reads), ``tasks`` (the resilient task and the naive one from the incident), ``app``
(the Celery app; ``celery -A examples.pipeline.app worker``).
"""
