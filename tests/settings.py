"""Settings of the test project: PostgreSQL by default, SQLite with RT_TEST_DB=sqlite.

Worker and relay processes started by the tests use these settings too, pointed at the
test database by RT_TEST_DB_NAME.
"""

from __future__ import annotations

import os
import uuid

# One set of queues per test session, so that runs never see each other's messages; worker
# and relay processes inherit the name through the environment.
os.environ.setdefault("RT_TEST_QUEUE", f"rt-tests-{uuid.uuid4().hex[:8]}")

SECRET_KEY = "tests-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "reliable_tasks",
    "tests.testapp",
    # Its tables, for the tests that run chords on its result backend (RT_TEST_RESULT_BACKEND).
    "django_celery_results",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
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

DB = os.environ.get("RT_TEST_DB", "postgres")
if DB == "sqlite":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("RT_TEST_DB_NAME", "test-reliable-tasks.sqlite3"),
            "TEST": {"NAME": os.environ.get("RT_TEST_DB_NAME", "test-reliable-tasks.sqlite3")},
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL;",
                "transaction_mode": "IMMEDIATE",
                # Relays, workers and the test share one file: wait for its lock, not 5 s.
                "timeout": 30,
            },
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("RT_TEST_DB_NAME", "reliable_tasks"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
        }
    }
    if os.environ.get("RT_TEST_PG_LOCK_TIMEOUT_MS"):
        # A worker that gives up waiting for a lock (a test holds one on the ledger).
        DATABASES["default"]["OPTIONS"] = {
            "options": f"-c lock_timeout={int(os.environ['RT_TEST_PG_LOCK_TIMEOUT_MS'])}"
        }

CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": os.environ.get("RT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"),
    }
}

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
CELERY_TASK_DEFAULT_QUEUE = os.environ["RT_TEST_QUEUE"]
CELERY_TASK_ROUTES = {
    "tests.testapp.tasks.routed": {"queue": os.environ["RT_TEST_QUEUE"] + ".routed"},
    "tests.testapp.tasks.with_options": {"priority": 3},
}
# Plain Celery publishing waits for RabbitMQ's confirms too (reliable_tasks.W004); the relay
# confirms its batches on its own channel whatever this says.
CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}
# No result backend, unless a test's workers need one (chords): "django-db" is
# django-celery-results' backend, on the test database.
if os.environ.get("RT_TEST_RESULT_BACKEND"):
    CELERY_RESULT_BACKEND = os.environ["RT_TEST_RESULT_BACKEND"]

# A worker of a test that consumes a quorum queue with a delivery limit, built by the topology
# helper as a project would; the default queue stays declared beside it.
if os.environ.get("RT_TEST_QUORUM_QUEUE"):
    from kombu import Queue

    from reliable_tasks.topology import quorum_queue

    CELERY_TASK_QUEUES = [
        Queue(os.environ["RT_TEST_QUEUE"]),
        *quorum_queue(
            os.environ["RT_TEST_QUORUM_QUEUE"],
            delivery_limit=int(os.environ.get("RT_TEST_QUORUM_LIMIT", "1")),
        ),
    ]
    # Celery's native delayed delivery, which a quorum queue turns on: classic queues, lighter
    # on the test's broker (the test removes them).
    CELERY_BROKER_NATIVE_DELAYED_DELIVERY_QUEUE_TYPE = "classic"

RELIABLE_TASKS_RELAY_POLL_INTERVAL = float(os.environ.get("RT_TEST_RELAY_POLL_INTERVAL", "0.2"))
RELIABLE_TASKS_DATABASE_DOWN_HOLD = float(os.environ.get("RT_TEST_DATABASE_DOWN_HOLD", "60"))
RELIABLE_TASKS_MAX_DELIVERIES = int(os.environ.get("RT_TEST_MAX_DELIVERIES", "5"))
RELIABLE_TASKS_MAX_RECORDED_ATTEMPTS = int(os.environ.get("RT_TEST_MAX_RECORDED_ATTEMPTS", "25"))
RELIABLE_TASKS_RELAY_IN_WORKER = os.environ.get("RT_TEST_RELAY_IN_WORKER") == "1"
RELIABLE_TASKS_RELAY_BATCH_SIZE = int(os.environ.get("RT_TEST_RELAY_BATCH_SIZE", "500"))
RELIABLE_TASKS_RELAY_HEARTBEAT_INTERVAL = float(
    os.environ.get("RT_TEST_RELAY_HEARTBEAT_INTERVAL", "1.0")
)
RELIABLE_TASKS_RELAY_RECONNECT_BACKOFF = (0.2, 2.0)
RELIABLE_TASKS_RELAY_CONFIRM_TIMEOUT = 10.0

# reliable_tasks logs at INFO through the root logger's handlers (the worker's, the relay's).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"reliable_tasks": {"level": "INFO"}},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
