"""Backoff and RetryPolicy: pure functions, checked against Brooker's formulas."""

from __future__ import annotations

import dataclasses
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reliable_tasks.retry import RetryPolicy, backoff

attempts = st.integers(min_value=1, max_value=200)
bases = st.floats(min_value=0.001, max_value=100, allow_nan=False)
seeds = st.integers(min_value=0, max_value=2**32)


def step(attempt: int, base: float, cap: float) -> float:
    return min(cap, base * 2 ** min(attempt - 1, 64))


@given(attempt=attempts, base=bases, extra=st.floats(min_value=0, max_value=1000), seed=seeds)
def test_full_jitter_is_uniform_between_zero_and_the_capped_step(
    attempt: int, base: float, extra: float, seed: int
) -> None:
    cap = base + extra
    delay = backoff(attempt, base=base, cap=cap, jitter="full", rng=random.Random(seed))
    assert 0 <= delay <= step(attempt, base, cap)


@given(attempt=attempts, base=bases, extra=st.floats(min_value=0, max_value=1000), seed=seeds)
def test_equal_jitter_keeps_at_least_half_the_step(
    attempt: int, base: float, extra: float, seed: int
) -> None:
    cap = base + extra
    delay = backoff(attempt, base=base, cap=cap, jitter="equal", rng=random.Random(seed))
    assert step(attempt, base, cap) / 2 <= delay <= step(attempt, base, cap)


@given(
    base=bases,
    extra=st.floats(min_value=0, max_value=1000),
    previous=st.floats(min_value=0, max_value=5000),
    seed=seeds,
)
def test_decorrelated_jitter_stays_between_base_and_three_times_the_previous_wait_capped(
    base: float, extra: float, previous: float, seed: int
) -> None:
    cap = base + extra
    delay = backoff(
        3, base=base, cap=cap, jitter="decorrelated", previous=previous, rng=random.Random(seed)
    )
    assert min(base, cap) <= delay <= min(cap, max(base, previous * 3))


@given(attempt=attempts, base=bases, extra=st.floats(min_value=0, max_value=1000))
def test_no_jitter_is_the_capped_exponential(attempt: int, base: float, extra: float) -> None:
    assert backoff(attempt, base=base, cap=base + extra, jitter="none") == step(
        attempt, base, base + extra
    )


def test_full_jitter_averages_half_the_step() -> None:
    rng = random.Random(7)
    delays = [backoff(4, base=1.0, cap=100.0, jitter="full", rng=rng) for _ in range(20_000)]
    assert statistics.fmean(delays) == pytest.approx(4.0, rel=0.03)
    # Uniform on [0, 8]: the variance is 8² / 12.
    assert statistics.pvariance(delays) == pytest.approx(64 / 12, rel=0.05)


def test_equal_jitter_averages_three_quarters_of_the_step() -> None:
    rng = random.Random(7)
    delays = [backoff(4, base=1.0, cap=100.0, jitter="equal", rng=rng) for _ in range(20_000)]
    assert statistics.fmean(delays) == pytest.approx(6.0, rel=0.02)


def test_decorrelated_jitter_is_uniform_between_base_and_three_times_the_previous_wait() -> None:
    rng = random.Random(7)
    delays = [
        backoff(5, base=2.0, cap=1000.0, jitter="decorrelated", previous=10.0, rng=rng)
        for _ in range(20_000)
    ]
    # Uniform on [2, 30]: mean 16, variance 28² / 12.
    assert statistics.fmean(delays) == pytest.approx(16.0, rel=0.02)
    assert statistics.pvariance(delays) == pytest.approx(28**2 / 12, rel=0.05)
    # A chain of waits, each fed the one before, reaches the cap and stays within it.
    wait, chain = 1.0, []
    for attempt in range(1, 40):
        wait = backoff(attempt, base=1.0, cap=60.0, jitter="decorrelated", previous=wait, rng=rng)
        chain.append(wait)
    assert max(chain) > 30.0
    assert all(1.0 <= w <= 60.0 for w in chain)


def test_a_policy_is_frozen_and_takes_keywords_only() -> None:
    policy = RetryPolicy(max_attempts=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        RetryPolicy(3)  # type: ignore[misc]
    assert policy == RetryPolicy(max_attempts=3)
    assert hash(policy) == hash(RetryPolicy(max_attempts=3))


def test_the_same_seed_gives_the_same_waits() -> None:
    first = [backoff(n, base=1, cap=60, rng=random.Random(42)) for n in range(1, 8)]
    again = [backoff(n, base=1, cap=60, rng=random.Random(42)) for n in range(1, 8)]
    assert first == again


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts counts the first attempt too"),
        ({"base": 10, "cap": 1}, "need 0 < base <= cap"),
        ({"jitter": "wild"}, "unknown jitter 'wild'"),
        ({"deadline": 0}, "deadline is a number of seconds > 0"),
        ({"retry_on": ValueError}, "retry_on must be a tuple of exception classes"),
    ],
)
def test_a_bad_policy_is_refused_with_the_reason(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_the_policy_decides_give_up_exhaustion_and_deadline() -> None:
    policy = RetryPolicy(
        max_attempts=3, base=2, cap=2, jitter="none", deadline=10, give_up_on=(KeyError,)
    )
    assert policy.decide(ValueError(), attempt=1, elapsed=0).delay == 2
    assert policy.decide(KeyError(), attempt=1, elapsed=0).reason == "give_up"
    assert policy.decide(ValueError(), attempt=3, elapsed=0).reason == "exhausted"
    assert policy.decide(ValueError(), attempt=1, elapsed=9).reason == "deadline"
    assert policy.decide(ValueError(), attempt=1, elapsed=0, requested_delay=5).delay == 5
