"""On PostgreSQL, every statement that inserts outbox rows sends NOTIFY reliable_tasks_outbox.

PostgreSQL delivers the notification when the inserting transaction commits (never on a
rollback) and folds repeats within one transaction, so a relay wakes once per commit with
no extra round trip on the caller's path. Other databases rely on the relay's polling.
"""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION reliable_tasks_outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('reliable_tasks_outbox', '');
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER reliable_tasks_outbox_notify
    AFTER INSERT ON reliable_tasks_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION reliable_tasks_outbox_notify();
"""

DROP = """
DROP TRIGGER IF EXISTS reliable_tasks_outbox_notify ON reliable_tasks_outbox;
DROP FUNCTION IF EXISTS reliable_tasks_outbox_notify();
"""


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [("reliable_tasks", "0001_initial")]
    operations = [migrations.RunPython(create, drop, elidable=False)]
