"""Settings of the demo shop.

The database, the broker and the cache come from the environment, so that ``run_demo.py`` and
the relay, workers and admin it starts all see the same ones:

- ``DATABASE_URL`` (``postgres://user:password@host:port/name``) selects PostgreSQL; without it,
  SQLite in the demo's state folder.
- ``CELERY_BROKER_URL`` selects the broker; without it, the RabbitMQ on 127.0.0.1.
  ``filesystem://`` is kombu's embedded transport, kept in the state folder.
- ``DEMO_CACHE_URL`` (``redis://...``) selects a Redis cache; without it, a cache in files in the
  state folder. Every process of the demo must share one: the metrics counters live there.
- ``DEMO_STATE_DIR`` is the state folder (default ``.demo/`` beside ``demo_project/``): the SQLite
  file, the logs, the embedded broker's and the file cache's folders. A second demo run with
  another state folder uses its own queue too, so both can run at once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEMO_DIR = Path(os.environ.get("DEMO_STATE_DIR") or PROJECT_DIR.parent / ".demo").resolve()
DEMO_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = "demo-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "reliable_tasks",
    "shop",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "demo.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
# runserver --insecure serves the admin's files from the apps, with DEBUG off.
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def postgres_from_url(url: str) -> dict[str, Any]:
    """Django's database settings for a ``postgres://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ImproperlyConfigured(
            f"DATABASE_URL must be a postgres:// URL, not {parts.scheme}://; "
            "unset it to use SQLite in the demo's state folder."
        )
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": dict(parse_qsl(parts.query)),  # e.g. ?sslmode=require
    }


if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": postgres_from_url(os.environ["DATABASE_URL"])}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DEMO_DIR / "demo.sqlite3",
            # WAL lets the workers and the relay read while the shop writes; IMMEDIATE takes the
            # write lock when a transaction begins, so concurrent writers wait instead of failing.
            # Five processes write at once: a writer may wait long for its turn, and a worker
            # that gave up would put its message back and count a delivery without an outcome.
            # synchronous=NORMAL: in WAL mode a killed process loses no commit; only a power cut
            # could lose the last ones, and the demo cuts no power.
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
            },
        }
    }

# The cache holds the metrics counters every worker adds to, and the done keys' fast path.
# The prefix is the run's: a fresh SQLite database must not meet the done keys of the last run.
CACHE_PREFIX = "demo-" + os.environ.get("DEMO_RUN_ID", "shop")
if os.environ.get("DEMO_CACHE_URL"):
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": os.environ["DEMO_CACHE_URL"],
            "KEY_PREFIX": CACHE_PREFIX,
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(DEMO_DIR / "cache"),
            "KEY_PREFIX": CACHE_PREFIX,
        }
    }

# Celery (read by demo/celery.py)
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A worker takes one message per pool process at a time: a killed worker holds few.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# When a pool process dies, Celery waits this long for a result it might have sent before
# putting its message back (10 s by default). The demo keeps no results: no need to wait.
CELERY_WORKER_LOST_WAIT = 1.0
if CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT = "demo.transport:Transport"
    BROKER_DIR = DEMO_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # One folder for both directions: the relay writes messages where the workers read them.
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "store_processed": True,
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "polling_interval": 0.1,
    }
    for folder in ("queue", "processed", "control"):
        (BROKER_DIR / folder).mkdir(parents=True, exist_ok=True)
else:
    # What Celery itself publishes waits for the broker's confirms too (reliable_tasks.W004).
    CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}

# One queue per state folder: the test suites, and demos run from other checkouts or folders,
# may share the same RabbitMQ and must not take each other's messages.
DEMO_QUEUE = "demo-shop-" + hashlib.sha256(str(DEMO_DIR).encode()).hexdigest()[:6]
CELERY_TASK_DEFAULT_QUEUE = DEMO_QUEUE

# reliable_tasks
RELIABLE_TASKS_CELERY_APP = "demo.celery:app"
# SQLite cannot wake the relay when a row commits (PostgreSQL's NOTIFY does); poll briskly.
RELIABLE_TASKS_RELAY_POLL_INTERVAL = 0.2
# The demo stops the broker for a few seconds: reconnect within two seconds of its return.
RELIABLE_TASKS_RELAY_RECONNECT_BACKOFF = (0.2, 2.0)
RELIABLE_TASKS_RELAY_HEARTBEAT_INTERVAL = 1.0
# A message whose deliveries kill their worker three times becomes a dead task (crash_loop).
RELIABLE_TASKS_MAX_DELIVERIES = 3

# The shop
# Seeds the payment gateway's timeouts: the same seed, the same timeouts for the same orders.
DEMO_SEED = int(os.environ.get("DEMO_SEED", "42"))
# The share of gateway calls that time out; half of them after the charge went through.
DEMO_GATEWAY_TIMEOUT_RATE = float(os.environ.get("DEMO_GATEWAY_TIMEOUT_RATE", "0.2"))

# The relay and the workers log what reliable_tasks decides (duplicates, retries, dead tasks).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"reliable_tasks": {"level": "INFO"}},
}
