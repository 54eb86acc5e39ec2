"""The migrations describe the models as they are: a model change without its migration fails."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command


@pytest.mark.django_db  # makemigrations reads which migrations were applied
def test_the_models_need_no_new_migration() -> None:
    out = io.StringIO()
    try:
        call_command(
            "makemigrations", "reliable_tasks", check=True, dry_run=True, stdout=out, verbosity=1
        )
    except SystemExit:
        pytest.fail(f"the models differ from the migrations:\n{out.getvalue()}")
