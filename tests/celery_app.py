"""The Celery app of the test project (the worker and relay processes load it)."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

from celery import Celery

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["tests.testapp"])

import reliable_tasks.worker  # noqa: E402 - after the app, as users would write it

# Dead letters always; the relay step only where RELIABLE_TASKS_RELAY_IN_WORKER is on
# (RT_TEST_RELAY_IN_WORKER=1).
reliable_tasks.worker.install(app)
