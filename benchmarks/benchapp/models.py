from __future__ import annotations

from django.db import models


class Order(models.Model):
    """The row a business transaction inserts before it enqueues its task."""

    customer = models.CharField(max_length=100)
    amount_cents = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"order {self.pk} of {self.customer}"
