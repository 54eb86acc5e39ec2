"""The small chaos run (tests/chaos, `make chaos` at full size) as part of the test suite."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(170)]


def test_a_small_chaos_run_loses_nothing_and_runs_nothing_twice(
    rabbitmq: None, redis_service: None
) -> None:
    """600 tasks while workers and a relay are SIGKILLed, RabbitMQ restarts twice, Redis
    stops, and messages that already ran arrive again: each effect exactly once, the poison
    tasks dead for their reason, the outbox drained, no lease held.
    """
    done = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--small"],
        cwd=ROOT, capture_output=True, text=True, timeout=160,
    )  # fmt: skip
    # The run's own account, with its seed: shown when the test fails (or with -s).
    print(done.stdout, done.stderr, sep="\n")
    assert done.returncode == 0, (
        f"the chaos run failed; replay it with its seed:\n{done.stdout[-8000:]}"
    )
