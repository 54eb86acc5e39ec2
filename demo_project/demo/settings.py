"""Settings of the demo shop.

The database and the broker come from the environment, so that ``run_demo.py`` and the relay
and worker it starts all see the same ones:

- ``DATABASE_URL`` (``postgres://user:password@host:port/name``) selects PostgreSQL; without it,
  SQLite in ``.demo/demo.sqlite3``.
- ``CELERY_BROKER_URL`` selects the broker; without it, the RabbitMQ on 127.0.0.1.
  ``filesystem://`` is kombu's embedded transport, kept in ``.demo/broker/``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

PROJECT_DIR = Path(__file__).resolve().parent.parent
# The SQLite file, the process logs and the embedded broker's folders (ignored by git).
DEMO_DIR = PROJECT_DIR.parent / ".demo"
DEMO_DIR.mkdir(exist_ok=True)

SECRET_KEY = "demo-only-not-a-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["reliable_tasks", "shop"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def postgres_from_url(url: str) -> dict[str, Any]:
    """Django's database settings for a ``postgres://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ImproperlyConfigured(
            f"DATABASE_URL must be a postgres:// URL, not {parts.scheme}://; "
            "unset it to use SQLite in .demo/demo.sqlite3."
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
            # WAL lets the worker and the relay read while the shop writes; IMMEDIATE takes the
            # write lock when a transaction begins, so concurrent writers wait instead of failing.
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL;",
                "transaction_mode": "IMMEDIATE",
            },
        }
    }

# Celery (read by demo/celery.py)
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
if CELERY_BROKER_URL.startswith("filesystem://"):
    BROKER_DIR = DEMO_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # One folder for both directions: the relay writes messages where the worker reads them.
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "store_processed": True,
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "polling_interval": 0.1,
    }
    for folder in ("queue", "processed", "control"):
        (BROKER_DIR / folder).mkdir(parents=True, exist_ok=True)

# One queue per checkout: the test suites, and demos run from other checkouts, may share the
# same RabbitMQ and must not take each other's messages.
DEMO_QUEUE = "demo-shop-" + hashlib.sha256(str(PROJECT_DIR).encode()).hexdigest()[:6]
CELERY_TASK_DEFAULT_QUEUE = DEMO_QUEUE

# reliable_tasks
RELIABLE_TASKS_CELERY_APP = "demo.celery:app"
# SQLite cannot wake the relay when a row commits (PostgreSQL's NOTIFY does); poll briskly.
RELIABLE_TASKS_RELAY_POLL_INTERVAL = 0.2
