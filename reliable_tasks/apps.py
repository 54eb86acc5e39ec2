from __future__ import annotations

from django.apps import AppConfig


class ReliableTasksConfig(AppConfig):
    name = "reliable_tasks"
    verbose_name = "Reliable tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import (
            checks,  # noqa: F401 - importing registers the system checks
            ledger,
            metrics,
        )
        from .integrations import sentry

        ledger.connect_worker_signals()
        metrics.connect()
        sentry.connect()
