"""Django settings of the census app: a django-redis cache with no keepalive options,
exactly as seed 000's CACHES block, and Celery settings in the CELERY_ namespace."""

from __future__ import annotations

import os

REDIS_URL = os.environ.get("CENSUS_REDIS_URL", "redis://127.0.0.1:6379")

SECRET_KEY = "census-example-not-secret"
INSTALLED_APPS: list[str] = []
USE_TZ = True

CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"{REDIS_URL}/2",
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.DefaultClient",
            # no SOCKET_KEEPALIVE, no SOCKET_KEEPALIVE_OPTIONS: the seed's gap
        },
    }
}

CELERY_BROKER_URL = os.environ.get("CENSUS_BROKER_URL", f"{REDIS_URL}/0")
CELERY_RESULT_BACKEND = f"{REDIS_URL}/1"
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# The broker's keepalive as seed 000 configured it: a boolean the Redis transport
# honours without timings (kernel default 7200 s idle), and py-amqp socket_settings
# the Redis transport silently ignores.
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_keepalive": True}

# celery-resilience settings from the environment (the tests shorten keepalive this way),
# e.g. CELERY_RESILIENCE_KEEPALIVE_IDLE=1.
globals().update({k: v for k, v in os.environ.items() if k.startswith("CELERY_RESILIENCE_")})
