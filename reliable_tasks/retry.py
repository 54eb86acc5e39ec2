"""Backoff arithmetic: pure functions, no Django, no Celery.

The formulas are Marc Brooker's from "Exponential Backoff And Jitter" (AWS Architecture
Blog, 2015). All randomness comes from the ``rng`` argument, so callers can seed it.
"""

from __future__ import annotations

import random
from typing import Literal

Jitter = Literal["full", "equal", "decorrelated", "none"]

_default_rng = random.Random()


def backoff(
    attempt: int,
    *,
    base: float,
    cap: float,
    jitter: Jitter = "full",
    previous: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before attempt ``attempt + 1``, given ``attempt`` (>= 1) failed.

    Args:
        attempt: How many attempts have failed so far, starting at 1.
        base: The first step of the exponential, in seconds.
        cap: No wait is longer than this.
        jitter: "full" (uniform in [0, step]), "equal" (step/2 plus uniform in [0, step/2]),
            "decorrelated" (uniform in [base, 3 * previous]) or "none" (the step itself).
        previous: The previous wait, for decorrelated jitter; ``base`` when omitted.
        rng: The source of randomness; a module-level one when omitted.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts failed attempts and starts at 1, got {attempt}")
    if base <= 0 or cap < base:
        raise ValueError(f"need 0 < base <= cap, got base={base}, cap={cap}")
    rng = rng or _default_rng
    # min() before pow() overflow: 2 ** 1100 is a float overflow.
    step = cap if attempt > 64 else min(cap, base * 2 ** (attempt - 1))
    if jitter == "none":
        return step
    if jitter == "full":
        return rng.uniform(0, step)
    if jitter == "equal":
        return step / 2 + rng.uniform(0, step / 2)
    if jitter == "decorrelated":
        prev = base if previous is None else previous
        return min(cap, rng.uniform(base, max(base, prev * 3)))
    raise ValueError(f"unknown jitter {jitter!r}; choose 'full', 'equal', 'decorrelated' or 'none'")
