"""The small chaos run (tests/chaos, `make chaos` at full size) as part of the test suite."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(300)]


def test_a_small_chaos_run_loses_nothing_and_runs_nothing_twice(
    rabbitmq: None, redis_service: None
) -> None:
    """600 tasks while workers and a relay are SIGKILLed, RabbitMQ restarts twice, Redis
    stops, and messages that already ran arrive again: each effect exactly once, the poison
    tasks dead for their reason, the outbox drained, no lease held.
    """
    run = subprocess.Popen(
        [sys.executable, "-m", "tests.chaos", "--small"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = run.communicate(timeout=150)
    except BaseException:
        # SIGTERM, not SIGKILL: the run stops its workers and relays, restarts any service it
        # stopped and drops its database before it exits.
        run.terminate()
        output, _ = run.communicate(timeout=120)
        print(output)
        raise
    # The run's own account, with its seed: shown when the test fails (or with -s).
    print(output)
    assert run.returncode == 0, f"the chaos run failed; replay it with its seed:\n{output[-8000:]}"
