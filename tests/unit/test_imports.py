"""The package can be imported before Django is set up, as a project's Celery module does."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def test_importing_the_package_and_the_worker_step_loads_no_models() -> None:
    code = (
        "import sys, reliable_tasks, reliable_tasks.worker, reliable_tasks.retry;"
        "assert 'reliable_tasks.models' not in sys.modules, 'models imported too early'"
    )
    # No DJANGO_SETTINGS_MODULE: importing a model would raise ImproperlyConfigured.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
