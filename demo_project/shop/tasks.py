"""The shop's background work: charge the card, send the receipt. Both are reliable tasks."""

from __future__ import annotations

import os
import signal

from reliable_tasks import ReliableTask, RetryPolicy, reliable_task

from . import gateway
from .models import Order, Receipt


@reliable_task(
    bind=True,
    # One charge per order, whichever message or retry runs it: the key names the order.
    idempotency_key=lambda order_id: f"charge:{order_id}",
    # Lease mode: the body calls another company's system, which no transaction of ours can
    # roll back. One execution at a time holds the key; a killed one's lease runs out after
    # 10 s (a charge takes well under a second) and the next delivery takes over.
    atomic=False,
    lease=10,
    # A timeout is worth another try, soon: the gateway's idempotency key makes it safe.
    retry=RetryPolicy(
        max_attempts=8, base=0.2, cap=3.0, jitter="full", retry_on=(gateway.GatewayTimeout,)
    ),
)
def charge_payment(self: ReliableTask, order_id: int) -> str:
    """Charge the order's total through the payment gateway; return the gateway's charge id.

    The gateway is handed this execution's idempotency key: if an earlier execution charged
    the card and then died, or its answer was lost, the gateway returns that first charge.
    """
    order = Order.objects.get(pk=order_id)
    made = gateway.charge(
        idempotency_key=str(self.idempotency_key), amount=order.total, order_number=order.pk
    )
    Order.objects.filter(pk=order.pk).update(charge_id=made.charge_id)
    return made.charge_id


@reliable_task(bind=True)
def send_receipt(self: ReliableTask, order_id: int) -> int:
    """Send the receipt of an order; here, record it as a ``Receipt`` row.

    A real shop would render a PDF and email it. The row stands for the email: if the task
    ran twice, the order would have two receipts. Atomic mode (the default): the row and the
    ledger's "done" commit together, so a crash in between leaves neither.
    """
    order = Order.objects.select_related("product").get(pk=order_id)
    if order.product.breaks_receipts:
        # The renderer (a C library, say) crashes on this product: the process dies on the
        # spot, as on a segfault or the kernel's OOM killer. No exception is raised, so no
        # retry policy sees it; only the redeliveries of the message can be counted.
        os.kill(os.getpid(), signal.SIGKILL)
    receipt = Receipt.objects.create(order=order, task_id=str(self.request.id))
    return receipt.pk
