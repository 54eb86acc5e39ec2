"""A shop in two tables: orders, and the receipts the background task sends for them."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Order(models.Model):
    customer = models.CharField(max_length=100)
    total = models.DecimalField(max_digits=10, decimal_places=2)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"order #{self.pk} for {self.customer}"


class Receipt(models.Model):
    """One row per execution of ``send_receipt``: counting rows counts executions.

    There is deliberately no unique constraint on ``order``: a task that ran twice must show up
    as a second row, not be hidden by an IntegrityError.
    """

    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="receipts")
    task_id = models.CharField(max_length=255)
    sent_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"receipt for order #{self.order_id}"
