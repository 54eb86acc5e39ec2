"""The shop's tables (products, orders, receipts) and the fake payment gateway's (charges, calls)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Product(models.Model):
    name = models.CharField(max_length=100, unique=True)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    breaks_receipts = models.BooleanField(
        default=False,
        help_text="The receipt renderer crashes its process on this product (the demo's poison). "
        "Untick it, then requeue the dead receipts.",
    )

    def __str__(self) -> str:
        return self.name


class Order(models.Model):
    customer = models.CharField(max_length=100)
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="orders")
    quantity = models.PositiveIntegerField(default=1)
    total = models.DecimalField(max_digits=10, decimal_places=2)
    created_at = models.DateTimeField(default=timezone.now)
    charge_id = models.CharField(
        max_length=40, blank=True, help_text="The gateway's charge, once charge_payment ran."
    )

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


# --------------------------------------------------------------------------------------------
# The payment gateway: another company's system, faked in two tables (see gateway.py). It
# knows the shop's orders only by number, as a real one knows them by a reference.


class GatewayCharge(models.Model):
    """A card charged: one per idempotency key, the way Stripe keeps them."""

    charge_id = models.CharField(max_length=40, unique=True)
    idempotency_key = models.CharField(max_length=255, unique=True)
    order_number = models.BigIntegerField(db_index=True)
    amount = models.DecimalField(max_digits=10, decimal_places=2)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.charge_id} {self.amount} (order #{self.order_number})"


class GatewayCall(models.Model):
    """One request to the gateway, and what became of it."""

    class Outcome(models.TextChoices):
        CHARGED = "charged", "charged the card"
        REPLAYED = "replayed", "answered from the idempotency key: the first charge"
        LOST = "lost", "request lost: never reached the gateway"

    idempotency_key = models.CharField(max_length=255, db_index=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    answered = models.BooleanField(
        help_text="False when the caller timed out: the request or the answer was lost."
    )
    at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.idempotency_key}: {self.outcome}{'' if self.answered else ', no answer'}"
