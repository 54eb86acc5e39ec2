"""The demo's Celery app, configured from the Django settings whose names start with ``CELERY_``."""

from __future__ import annotations

import os

import reliable_tasks.worker
from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")

app = Celery("demo")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Messages Celery would discard (unknown task, undecodable body) become dead tasks instead.
reliable_tasks.worker.install(app)
