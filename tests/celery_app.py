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

if os.environ.get("RT_TEST_SENTRY_ENVELOPES"):
    # tests/integration/test_sentry.py: the worker reports to Sentry as a user's would, through
    # a transport that appends each envelope item to this file (one JSON line) instead of
    # sending it.
    import json

    import sentry_sdk
    from sentry_sdk.envelope import Envelope
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.django import DjangoIntegration
    from sentry_sdk.transport import Transport

    class _FileTransport(Transport):
        def capture_envelope(self, envelope: Envelope) -> None:
            with open(os.environ["RT_TEST_SENTRY_ENVELOPES"], "a") as out:
                for item in envelope.items:
                    out.write(json.dumps({"type": item.type, "payload": item.payload.json}) + "\n")

    sentry_sdk.init(
        dsn="https://key@sentry.invalid/1",
        transport=_FileTransport(),
        traces_sample_rate=1.0,
        integrations=[CeleryIntegration(), DjangoIntegration()],
    )
