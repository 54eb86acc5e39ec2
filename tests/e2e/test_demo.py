"""`make demo`, run the way CI runs it: no admin, a report, an exit code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow


def run_demo(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    # The demo's own settings and state: a SQLite file, logs and queue of its own under
    # tmp_path, so that it shares nothing with this test run or with a `make demo` beside it.
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL") and not key.startswith("RT_TEST_")
    }
    env.update(DEMO_NO_ADMIN="1", DEMO_STATE_DIR=str(tmp_path / "demo"), **settings)
    return subprocess.run(
        [sys.executable, str(ROOT / "demo_project" / "run_demo.py")],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )


def assert_nothing_lost_or_doubled(done: subprocess.CompletedProcess[str]) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(r"^\s*lost\s+0\b", done.stdout, re.MULTILINE), output
    assert re.search(r"^\s*doubled\s+0\b", done.stdout, re.MULTILINE), output
    assert re.search(r"crash_loop", done.stdout), output  # the poison product, dead


@pytest.mark.timeout(300)
def test_the_demo_reports_nothing_lost_or_doubled_and_exits_0(tmp_path: Path) -> None:
    done = run_demo(tmp_path, DEMO_ORDERS="120")
    assert_nothing_lost_or_doubled(done)
    # The faults it promises happened, on the local RabbitMQ.
    assert "broker amqp://" in done.stdout, done.stdout
    assert re.search(r"FAULT  SIGKILL to worker-\d", done.stdout), done.stdout
    assert "FAULT  stopping RabbitMQ" in done.stdout, done.stdout
    assert "RabbitMQ serves again" in done.stdout, done.stdout
    assert "skipped" not in done.stdout, done.stdout


@pytest.mark.timeout(300)
def test_the_demo_falls_back_to_the_embedded_transport_with_a_notice(tmp_path: Path) -> None:
    done = run_demo(tmp_path, DEMO_ORDERS="60", DEMO_BROKER="embedded")
    assert_nothing_lost_or_doubled(done)
    assert "NOTICE: DEMO_BROKER=embedded." in done.stdout, done.stdout
    assert "falls back to kombu's embedded filesystem:// transport" in done.stdout
    assert "FAULT  worker kill skipped" in done.stdout
    assert "FAULT  broker outage skipped: the embedded transport has no broker to stop" in (
        done.stdout
    )
