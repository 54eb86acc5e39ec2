"""Django settings of the benchmark: its own PostgreSQL database and its own queues.

The database (``RT_BENCH_DB``, default ``rt_bench``) is created afresh by ``run.py`` and the
queue names carry a random suffix (``RT_BENCH_QUEUE``), so a benchmark never touches what the
test suite, running beside it on the same services, uses. The relay subprocess that ``run.py``
starts inherits both names through the environment.
"""

from __future__ import annotations

import os
import uuid

os.environ.setdefault("RT_BENCH_QUEUE", f"rt-bench-{uuid.uuid4().hex[:8]}")
os.environ.setdefault("RT_BENCH_DB", "rt_bench")

QUEUE = os.environ["RT_BENCH_QUEUE"]
# Where the stock Celery baselines publish, beside the reliable tasks' queue.
CELERY_QUEUE = QUEUE + ".celery"

SECRET_KEY = "benchmarks-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "reliable_tasks",
    "benchmarks.benchapp",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["RT_BENCH_DB"],
        "USER": os.environ.get("PGUSER", "postgres"),
        "HOST": "127.0.0.1",
        "PORT": os.environ.get("PGPORT", "5432"),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
CELERY_BROKER_URL = BROKER_URL
# The like-for-like baseline: stock Celery with publisher confirms, as a careful team would
# configure it. The relay shares this app (it confirms per batch on its own channel).
CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}
CELERY_TASK_DEFAULT_QUEUE = QUEUE

RELIABLE_TASKS_CELERY_APP = "benchmarks.celery_app:app"
# Celery's Django fixup closes the database connection around every task unless this is set;
# the worker benchmark sets it for one extra round (run.py passes it through the environment).
CELERY_DB_REUSE_MAX = int(os.environ.get("RT_BENCH_DB_REUSE_MAX", "0")) or None

# The ledger's fast path for finished keys, as in production: Redis through django-redis.
CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": os.environ.get("RT_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"reliable_tasks": {"handlers": ["console"], "level": "WARNING"}},
}
