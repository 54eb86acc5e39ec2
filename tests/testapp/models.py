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


class GatewayCharge(models.Model):
    """A fake payment provider's charges (tests/chaos): one per idempotency key, as Stripe's.

    ``order`` is the business id: more than one charge for an order means a task handed the
    provider a key that was not stable across its executions.
    """

    idempotency_key = models.CharField(max_length=255, unique=True)
    order = models.CharField(max_length=100, db_index=True)
    amount = models.IntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.order} {self.amount}"


class GatewayRequest(models.Model):
    """Every call the fake payment provider received, replays of a known key included."""

    idempotency_key = models.CharField(max_length=255)
    order = models.CharField(max_length=100)
    replayed = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.idempotency_key} replayed={self.replayed}"
