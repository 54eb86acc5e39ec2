"""Backoff arithmetic: pure functions, no Django, no Celery.

The formulas are Marc Brooker's from "Exponential Backoff And Jitter" (AWS Architecture
Blog, 2015). All randomness comes from the ``rng`` argument, so callers can seed it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
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


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """When and how soon a failed task runs again.

    Args:
        max_attempts: Attempts in all, the first included; after the last one fails the task
            becomes a dead task.
        base: The first backoff step, in seconds.
        cap: No wait is longer than this, in seconds.
        jitter: "full", "equal", "decorrelated" or "none" (see ``backoff``).
        deadline: Seconds from the first attempt after which no retry is scheduled.
        retry_on: Exception classes worth a retry; others make the task dead at once.
        give_up_on: Exception classes that make the task dead at once, even if ``retry_on``
            matches them too.
    """

    max_attempts: int = 5
    base: float = 1.0
    cap: float = 300.0
    jitter: Jitter = "full"
    deadline: float | None = None
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(
                f"max_attempts counts the first attempt too and must be >= 1, got {self.max_attempts}"
            )
        if self.base <= 0 or self.cap < self.base:
            raise ValueError(f"need 0 < base <= cap, got base={self.base}, cap={self.cap}")
        if self.jitter not in ("full", "equal", "decorrelated", "none"):
            raise ValueError(
                f"unknown jitter {self.jitter!r}; choose 'full', 'equal', 'decorrelated' or 'none'"
            )
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError(f"deadline is a number of seconds > 0, got {self.deadline}")
        for name in ("retry_on", "give_up_on"):
            classes = getattr(self, name)
            if not isinstance(classes, tuple) or not all(
                isinstance(c, type) and issubclass(c, BaseException) for c in classes
            ):
                raise ValueError(f"{name} must be a tuple of exception classes, got {classes!r}")

    def decide(
        self,
        exc: BaseException,
        *,
        attempt: int,
        elapsed: float,
        previous_delay: float | None = None,
        requested_delay: float | None = None,
        requested: bool = False,
        rng: random.Random | None = None,
    ) -> Decision:
        """Retry or give up after ``attempt`` (1-based) failed with ``exc``.

        Args:
            elapsed: Seconds since the first attempt started.
            previous_delay: The wait before this attempt, for decorrelated jitter.
            requested_delay: A delay the task asked for (``Retry(delay=...)``); it replaces the
                backoff but still counts against ``max_attempts`` and ``deadline``.
            requested: The task asked for a retry (``Retry``, ``self.retry()``): retried whatever
                ``retry_on`` says, after ``requested_delay`` or, without one, the backoff.
        """
        if isinstance(exc, self.give_up_on):
            return Decision(retry=False, reason="give_up", delay=0.0)
        if not (requested or requested_delay is not None) and not isinstance(exc, self.retry_on):
            return Decision(retry=False, reason="not_retryable", delay=0.0)
        if attempt >= self.max_attempts:
            return Decision(retry=False, reason="exhausted", delay=0.0)
        if requested_delay is not None:
            delay = max(0.0, float(requested_delay))
        else:
            delay = backoff(
                attempt,
                base=self.base,
                cap=self.cap,
                jitter=self.jitter,
                previous=previous_delay,
                rng=rng,
            )
        if self.deadline is not None and elapsed + delay > self.deadline:
            return Decision(retry=False, reason="deadline", delay=0.0)
        return Decision(retry=True, reason="retry", delay=delay)


@dataclass(frozen=True)
class Decision:
    """What ``RetryPolicy.decide`` chose: retry after ``delay`` seconds, or give up for ``reason``."""

    retry: bool
    reason: str
    delay: float
