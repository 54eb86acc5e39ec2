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


@pytest.mark.timeout(300)
def test_the_demo_reports_nothing_lost_or_doubled_and_exits_0(
    tmp_path: Path,
) -> None:
    # The demo's own settings and state: a SQLite file, logs and queue of its own under
    # tmp_path, so that it shares nothing with this test run or with a `make demo` beside it.
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL") and not key.startswith("RT_TEST_")
    }
    env.update(DEMO_NO_ADMIN="1", DEMO_STATE_DIR=str(tmp_path / "demo"), DEMO_ORDERS="120")
    done = subprocess.run(
        [sys.executable, str(ROOT / "demo_project" / "run_demo.py")],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(r"^\s*lost\s+0\b", done.stdout, re.MULTILINE), output
    assert re.search(r"^\s*doubled\s+0\b", done.stdout, re.MULTILINE), output
    assert re.search(r"crash_loop", done.stdout), output
