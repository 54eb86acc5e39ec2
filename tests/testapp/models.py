from __future__ import annotations

from django.db import models


class Effect(models.Model):
    """One row per execution of a test task: counting rows counts executions."""

    key = models.CharField(max_length=200, db_index=True)
    task_id = models.CharField(max_length=255, blank=True)
    payload = models.JSONField(null=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.key


class Observed(models.Model):
    """What the ledger told a worker process: a duplicate hit or a deferral (via signals)."""

    kind = models.CharField(max_length=20)
    key = models.CharField(max_length=200)
    cached = models.BooleanField(default=False)
    result = models.JSONField(null=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.kind} {self.key}"
