"""Stored results move out of the ledger's row into a table of their own (``KeyResult``).

Existing results are copied over before the ledger's column goes; going back copies them home.
Stop the workers while it runs: a result an older worker stores between the copy and the
column's removal would be lost (its duplicates would get None).
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("reliable_tasks", "0009_ledger_attempts_unchecked"),
    ]

    operations = [
        migrations.CreateModel(
            name="KeyResult",
            fields=[
                (
                    "key",
                    models.OneToOneField(
                        db_column="ledger_id",
                        db_constraint=False,
                        on_delete=django.db.models.deletion.DO_NOTHING,
                        primary_key=True,
                        related_name="stored",
                        serialize=False,
                        to="reliable_tasks.idempotencykey",
                    ),
                ),
                ("result", models.JSONField()),
            ],
            options={
                "verbose_name": "stored result",
                "db_table": "reliable_tasks_ledger_result",
            },
        ),
        migrations.RunSQL(
            "INSERT INTO reliable_tasks_ledger_result (ledger_id, result) "
            "SELECT id, result FROM reliable_tasks_ledger WHERE result IS NOT NULL",
            reverse_sql="UPDATE reliable_tasks_ledger SET result = ("
            "SELECT r.result FROM reliable_tasks_ledger_result r "
            "WHERE r.ledger_id = reliable_tasks_ledger.id)",
            hints={"model_name": "idempotencykey"},
        ),
        migrations.RemoveField(
            model_name="idempotencykey",
            name="result",
        ),
    ]
