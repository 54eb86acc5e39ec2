from django.db import migrations, models


class Migration(migrations.Migration):
    """Dead-task counts by reason and by task from two indexes (status first)."""

    dependencies = [
        ("reliable_tasks", "0007_outbox_header_table"),
    ]

    operations = [
        migrations.AlterField(
            model_name="deadtask",
            name="status",
            field=models.CharField(
                choices=[("dead", "dead"), ("requeued", "requeued"), ("discarded", "discarded")],
                default="dead",
                max_length=16,
            ),
        ),
        migrations.AddIndex(
            model_name="deadtask",
            index=models.Index(fields=["status", "reason"], name="rt_dead_status_reason"),
        ),
        migrations.AddIndex(
            model_name="deadtask",
            index=models.Index(fields=["status", "task_name"], name="rt_dead_status_task"),
        ),
    ]
