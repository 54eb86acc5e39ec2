"""Database tables: the outbox and the relays' heartbeats."""

from __future__ import annotations

from typing import Any

from django.db import models
from django.utils import timezone


class OutboxStatus(models.TextChoices):
    PENDING = "pending", "pending"
    DISPATCHED = "dispatched", "dispatched"


class OutboxMessage(models.Model):
    """One task message waiting for, or done with, its publication to the broker.

    The row holds the message exactly as Celery's ``apply_async`` would publish it (headers,
    properties, encoded body, exchange and routing key), so the relay only has to send it.
    """

    id = models.BigAutoField(primary_key=True)
    task_id = models.CharField(max_length=255, db_index=True)
    task_name = models.CharField(max_length=255)
    queue = models.CharField(
        max_length=255, blank=True, help_text="Queue to declare before publishing."
    )
    exchange = models.CharField(max_length=255, blank=True)
    routing_key = models.CharField(max_length=255, blank=True)
    headers = models.JSONField()
    header_table = models.BinaryField(
        null=True,
        editable=False,
        help_text="The headers as an AMQP field table, written at enqueue; the relay sends it as "
        "it is. Null when the relay writes it from the headers.",
    )
    properties = models.JSONField()
    body = models.TextField()
    content_type = models.CharField(max_length=100)
    content_encoding = models.CharField(max_length=32)
    status = models.CharField(
        max_length=16, choices=OutboxStatus.choices, default=OutboxStatus.PENDING
    )
    created_at = models.DateTimeField(default=timezone.now)
    due_at = models.DateTimeField(default=timezone.now, help_text="Not published before this time.")
    dispatched_at = models.DateTimeField(null=True, blank=True)
    publish_attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    failing_since = models.DateTimeField(
        null=True, blank=True, help_text="When the broker first refused it (unset until then)."
    )
    retries = models.PositiveIntegerField(
        default=0, help_text="0 for a first attempt; n for the n-th retry."
    )

    class Meta:
        db_table = "reliable_tasks_outbox"
        verbose_name = "outbox message"
        indexes = [
            # The relay's claim: pending rows in due order; the partial index stays small.
            models.Index(
                fields=["due_at", "id"],
                name="rt_outbox_pending_due",
                condition=models.Q(status="pending"),
            ),
            models.Index(
                fields=["dispatched_at"],
                name="rt_outbox_dispatched",
                condition=models.Q(status="dispatched"),
            ),
            # Health's question, how long rows have been refused: only refused rows are in it.
            models.Index(
                fields=["failing_since"],
                name="rt_outbox_failing",
                condition=models.Q(status="pending", failing_since__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] {self.status}"


class RelayHeartbeat(models.Model):
    """The last sign of life of one relay process."""

    name = models.CharField(max_length=255, unique=True, help_text="hostname:pid of the relay.")
    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()
    dispatched_total = models.BigIntegerField(default=0)
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "reliable_tasks_relay_heartbeat"

    def __str__(self) -> str:
        return self.name


class LedgerState(models.TextChoices):
    RUNNING = "running", "running"
    DONE = "done", "done"


class IdempotencyKey(models.Model):
    """One idempotency key of one task: who holds it, and the result once it is done.

    Atomic-mode keys commit only as "done", together with the task's own writes. Lease-mode
    keys commit "running" with a lease; a holder that dies lets the lease expire.
    """

    id = models.BigAutoField(primary_key=True)
    task_name = models.CharField(max_length=255)
    key = models.CharField(max_length=255)
    state = models.CharField(max_length=16, choices=LedgerState.choices)
    fingerprint = models.CharField(
        max_length=64, help_text="SHA-256 of the arguments first used with the key."
    )
    token = models.CharField(max_length=32, help_text="Identifies the current holder's claim.")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Not a PositiveIntegerField: its CHECK constraint would cost every execution's claim (a new
    # database session per task, as Celery gives) the constraint's loading; only the ledger writes it.
    attempts = models.IntegerField(default=1)
    task_id = models.CharField(
        max_length=255, blank=True, help_text="The execution that holds or completed the key."
    )
    worker = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "reliable_tasks_ledger"
        verbose_name = "idempotency key"
        constraints = [
            models.UniqueConstraint(fields=["task_name", "key"], name="rt_ledger_task_key")
        ]
        indexes = [
            models.Index(fields=["completed_at"], name="rt_ledger_completed"),
            models.Index(
                fields=["lease_expires_at"],
                name="rt_ledger_lease",
                condition=models.Q(state="running"),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}:{self.key} {self.state}"

    @property
    def result(self) -> Any:
        """The stored result (as ``ledger.encode_result`` stored it), or None."""
        try:
            return self.stored.result
        except KeyResult.DoesNotExist:
            return None


class KeyResult(models.Model):
    """The stored result of a done idempotency key that returned one (not None).

    A table of its own, written once, by an insert of two values: in atomic mode the task's
    transaction ends with it, and a new database session (which Celery gives every task) runs
    an insert into this narrow table for less than it would an update of the ledger's row. No
    foreign key constraint in the database, whose check would cost every insert a query on the
    ledger, and no cascade in Django, which would make every delete of keys a read first and
    then a delete by primary key (a key's state no longer checked as it goes): pruning deletes
    the results of the keys it deletes, and keys deleted otherwise leave theirs, which nothing
    reads while the id is not given out again (a key that gets it after a sequence reset and
    returns a value replaces the result left; one that returns None would read it).
    """

    key = models.OneToOneField(
        IdempotencyKey,
        primary_key=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_column="ledger_id",
        related_name="stored",
    )
    result = models.JSONField()

    class Meta:
        db_table = "reliable_tasks_ledger_result"
        verbose_name = "stored result"

    def __str__(self) -> str:
        return f"result of {self.key_id}"


class TaskAttempt(models.Model):
    """One attempt of a task that did not succeed: its error, where and when it ran.

    Successful attempts leave no row; an attempt that never reported back (its worker was
    killed) is recorded as "lost" when the message is delivered again, and one whose ledger
    statement failed while the database answered as "requeued", with that error.
    """

    class Outcome(models.TextChoices):
        FAILED = "failed", "failed"
        LOST = "lost", "lost (the delivery ended without an outcome)"
        REDELIVERED = "redelivered", "redelivered (no sign that the earlier delivery ran)"
        REQUEUED = "requeued", "requeued (a statement of the ledger failed)"

    id = models.BigAutoField(primary_key=True)
    task_id = models.CharField(max_length=255, db_index=True)
    task_name = models.CharField(max_length=255)
    idempotency_key = models.CharField(max_length=255, blank=True)
    number = models.PositiveIntegerField(help_text="1 for the first attempt.")
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    exc_type = models.CharField(max_length=255, blank=True)
    message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    worker = models.CharField(max_length=255, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "reliable_tasks_attempt"
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] attempt {self.number} {self.outcome}"


class DeadReason(models.TextChoices):
    EXHAUSTED = "exhausted", "retries exhausted"
    DEADLINE = "deadline", "deadline passed"
    GIVE_UP = "give_up", "give-up exception"
    NOT_RETRYABLE = "not_retryable", "exception not in retry_on"
    CRASH_LOOP = "crash_loop", "crash loop (delivered too often without an outcome)"
    UNREGISTERED = "unregistered", "no such task registered"
    UNDECODABLE = "undecodable", "message cannot be decoded"
    KEY_REUSED = "key_reused", "idempotency key reused with other arguments"
    DEAD_LETTERED = "dead_lettered", "dead-lettered by the broker"


class DeadStatus(models.TextChoices):
    DEAD = "dead", "dead"
    REQUEUED = "requeued", "requeued"
    DISCARDED = "discarded", "discarded"


class DeadTask(models.Model):
    """A task that will not succeed by itself, kept with everything needed to replay it.

    ``headers``, ``body`` and the routing fields are the message as it was published, so a
    requeue sends the same message again through the outbox. For a message that could not be
    decoded, ``body`` holds the raw bytes as base64 and ``content_encoding`` is "base64".
    """

    id = models.BigAutoField(primary_key=True)
    task_id = models.CharField(max_length=255, db_index=True, blank=True)
    task_name = models.CharField(max_length=255, db_index=True, blank=True)
    args = models.JSONField(null=True, blank=True)
    kwargs = models.JSONField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=255, blank=True, db_index=True)
    queue = models.CharField(max_length=255, blank=True)
    exchange = models.CharField(max_length=255, blank=True)
    routing_key = models.CharField(max_length=255, blank=True)
    headers = models.JSONField(default=dict, blank=True)
    properties = models.JSONField(default=dict, blank=True)
    body = models.TextField(blank=True)
    content_type = models.CharField(max_length=100, blank=True)
    content_encoding = models.CharField(max_length=32, blank=True)
    reason = models.CharField(max_length=32, choices=DeadReason.choices, db_index=True)
    exc_type = models.CharField(max_length=255, blank=True, db_index=True)
    exc_message = models.TextField(blank=True)
    attempts = models.JSONField(
        default=list, blank=True, help_text="Every recorded attempt, oldest first."
    )
    attempt_count = models.PositiveIntegerField(default=0)
    first_failed_at = models.DateTimeField(default=timezone.now)
    last_failed_at = models.DateTimeField(default=timezone.now, db_index=True)
    status = models.CharField(max_length=16, choices=DeadStatus.choices, default=DeadStatus.DEAD)
    status_changed_at = models.DateTimeField(null=True, blank=True)
    status_changed_by = models.CharField(max_length=150, blank=True)
    requeued_outbox_id = models.BigIntegerField(
        null=True, blank=True, help_text="The outbox row of the last requeue."
    )
    requeued_task_id = models.CharField(max_length=255, blank=True)

    class Meta:
        db_table = "reliable_tasks_dead"
        verbose_name = "dead task"
        ordering = ["-last_failed_at", "-id"]
        indexes = [
            # The snapshot counts the dead tasks nobody acted on by reason and by task: from
            # these indexes alone, however many requeued and discarded ones are kept. The first
            # also serves every filter on the status.
            models.Index(fields=["status", "reason"], name="rt_dead_status_reason"),
            models.Index(fields=["status", "task_name"], name="rt_dead_status_task"),
        ]
        permissions = [
            ("requeue_deadtask", "Can requeue dead tasks"),
            ("discard_deadtask", "Can discard dead tasks"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name or '(no task name)'}[{self.task_id}] {self.get_reason_display()}"
