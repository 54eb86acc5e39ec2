"""A fake payment gateway: another company's service, reduced to two tables.

It behaves like Stripe's API where the demo needs it to:

- A charge request carries an idempotency key. A second request with the same key gets the
  first charge back; the card is not charged again.
- Now and then a request times out. Sometimes the request was lost on its way, sometimes the
  answer was, after the card was charged. The caller cannot tell which one: it must ask again,
  with the same key.

Which calls time out is decided by ``DEMO_SEED``, the key and how many calls for that key came
before, so a run can be replayed.
"""

from __future__ import annotations

import random
import time
import uuid
from decimal import Decimal

from django.conf import settings
from django.db import transaction

from .models import GatewayCall, GatewayCharge

#: How long a caller waits for an answer that does not come (kept short: it is a demo).
TIMEOUT_SECONDS = 0.2


class GatewayTimeout(Exception):
    """No answer in time: the card may or may not have been charged."""


class GatewayError(Exception):
    """A final refusal: retrying the same request cannot help."""


def charge(*, idempotency_key: str, amount: Decimal, order_number: int) -> GatewayCharge:
    """Charge ``amount`` once per ``idempotency_key``; return the charge.

    Raises:
        GatewayTimeout: no answer in time (the charge may have been made).
        GatewayError: the key was used before for another amount or order.
    """
    earlier_calls = GatewayCall.objects.filter(idempotency_key=idempotency_key).count()
    fate = random.Random(f"{settings.DEMO_SEED}:{idempotency_key}:{earlier_calls}").random()
    rate = settings.DEMO_GATEWAY_TIMEOUT_RATE
    if fate < rate / 2:
        GatewayCall.objects.create(
            idempotency_key=idempotency_key, outcome=GatewayCall.Outcome.LOST, answered=False
        )
        _time_out()
    with transaction.atomic():
        made, created = GatewayCharge.objects.get_or_create(
            idempotency_key=idempotency_key,
            defaults={
                "charge_id": f"ch_{uuid.uuid4().hex[:16]}",
                "order_number": order_number,
                "amount": amount,
            },
        )
        if not created and (made.amount, made.order_number) != (amount, order_number):
            raise GatewayError(
                f"idempotency key {idempotency_key!r} was used for order #{made.order_number} "
                f"({made.amount}); this request is for order #{order_number} ({amount})"
            )
        answered = fate >= rate
        GatewayCall.objects.create(
            idempotency_key=idempotency_key,
            outcome=GatewayCall.Outcome.CHARGED if created else GatewayCall.Outcome.REPLAYED,
            answered=answered,
        )
    if not answered:
        _time_out()
    return made


def _time_out() -> None:
    time.sleep(TIMEOUT_SECONDS)
    raise GatewayTimeout(f"the payment gateway did not answer within {TIMEOUT_SECONDS} s")
