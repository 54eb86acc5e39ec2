"""The benchmark's Celery apps: one with publisher confirms, one without.

``app`` is the application a project would run: publisher confirms on, the relay's app. The
second app differs only in ``confirm_publish``; it gives the unconfirmed ``delay_on_commit``
figure, which is faster and can lose messages.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")

from celery import Celery

app = Celery("benchmarks")
app.config_from_object("django.conf:settings", namespace="CELERY")

unconfirmed_app = Celery("benchmarks-unconfirmed", set_as_current=False)
unconfirmed_app.config_from_object("django.conf:settings", namespace="CELERY")
unconfirmed_app.conf.broker_transport_options = {"confirm_publish": False}
