"""Seed 000's deployment: every kind of Redis connection a Django/Celery worker opens.

``celery -A examples.census.app worker`` with ``CENSUS_REDIS_URL`` (broker, result
backend, django-redis cache, application clients) and optionally ``CENSUS_BROKER_URL``
(e.g. RabbitMQ, as in seed 000). ``CENSUS_PLUGIN=0`` runs it without celery-resilience.
"""
