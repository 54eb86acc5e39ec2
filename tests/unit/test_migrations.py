"""The migrations describe the models as they are: a model change without its migration fails."""

from __future__ import annotations

import io
import json

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


@pytest.mark.django_db(transaction=True)
def test_stored_results_move_to_their_table_and_back() -> None:
    """Migration 0010 copies the ledger's results into ``KeyResult``'s table; going back copies
    them home."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before = ("reliable_tasks", "0009_ledger_attempts_unchecked")
    after = ("reliable_tasks", "0010_ledger_result_table")

    def migrate(target: tuple[str, str]) -> None:
        executor = MigrationExecutor(connection)
        executor.migrate([target])

    def as_json(value: object) -> object:
        return json.loads(value) if isinstance(value, str) else value  # SQLite gives text

    def rows(sql: str) -> list[tuple[object, ...]]:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return sorted(cursor.fetchall(), key=repr)

    insert = (
        "INSERT INTO reliable_tasks_ledger (id, task_name, key, state, fingerprint, token, "
        "attempts, task_id, worker, created_at, updated_at, result) VALUES "
        "(%s, 't', %s, 'done', 'f', 'x', 1, '', '', %s, %s, %s)"
    )
    migrate(before)
    try:
        now = "2026-01-01 00:00:00+00:00"
        with connection.cursor() as cursor:
            cursor.execute(insert, [1, "with", now, now, '{"n": 1}'])
            cursor.execute(insert, [2, "without", now, now, None])
        migrate(after)
        stored = rows("SELECT ledger_id, result FROM reliable_tasks_ledger_result")
        assert [(ledger_id, as_json(result)) for ledger_id, result in stored] == [(1, {"n": 1})]
        migrate(before)
        home = rows("SELECT id, result FROM reliable_tasks_ledger")
        assert [(i, as_json(result)) for i, result in home] == [(1, {"n": 1}), (2, None)]
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM reliable_tasks_ledger")
        call_command("migrate", verbosity=0)
