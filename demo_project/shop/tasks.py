"""The shop's background work, declared as a reliable task."""

from __future__ import annotations

from reliable_tasks import ReliableTask, reliable_task

from .models import Order, Receipt


@reliable_task(bind=True)
def send_receipt(self: ReliableTask, order_id: int) -> int:
    """Send the receipt of an order; here, record it as a ``Receipt`` row.

    A real shop would email the customer. The row stands for the email: if the task ran twice,
    the order would have two receipts.
    """
    order = Order.objects.get(pk=order_id)
    receipt = Receipt.objects.create(order=order, task_id=str(self.request.id))
    return receipt.pk
