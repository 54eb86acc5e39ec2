"""The management command refuses input it cannot act on, and says what it did."""

from __future__ import annotations

import io
import threading

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from reliable_tasks.models import DeadTask
from tests.support import make_dead_task
from tests.testapp.tasks import record

pytestmark = pytest.mark.django_db(transaction=True)


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("reliable_tasks", *args, stdout=out)
    return out.getvalue()


def test_a_since_that_names_no_real_day_is_refused_with_what_to_give() -> None:
    make_dead_task(record, "kept")
    with pytest.raises(CommandError, match=r"'2026-02-30T10:00' is no valid time .*ISO 8601"):
        run("requeue", "--since", "2026-02-30T10:00")
    assert DeadTask.objects.get().status == "dead"


@pytest.mark.parametrize("size", ["0", "-5"])
def test_a_prune_batch_size_below_one_is_refused_not_replaced_by_the_default(size: str) -> None:
    with pytest.raises(CommandError, match=f"--batch-size .* at least 1, got {size}; leave it out"):
        run("prune", "--batch-size", size)


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "inf"])
def test_a_dead_letters_interval_that_is_not_positive_is_refused(interval: str) -> None:
    """-1 would crash in time.sleep after a first pass, 0 would poll the broker nonstop, and
    nan or inf end in a traceback from time.sleep."""
    with pytest.raises(
        CommandError,
        match=f"--interval takes a finite number of seconds > 0, got {float(interval)}",
    ):
        run("dead-letters", "--queue", "any", "--follow", "--interval", interval)


def test_a_relay_once_timeout_that_is_not_positive_is_refused() -> None:
    with pytest.raises(CommandError, match="--timeout takes a finite number of seconds > 0, got 0"):
        run("relay", "--once", "--timeout", "0")


@pytest.mark.postgres  # rows another operator holds are skipped only where rows can be locked
def test_requeue_tells_tasks_it_cannot_send_from_tasks_someone_else_was_acting_on() -> None:
    """Only a dead task that cannot be sent again is one to discard: one that another requeue
    or discard held at the same time is theirs, and may well be fine."""
    make_dead_task(record, "sendable")
    make_dead_task(record, "undecodable", content_encoding="base64")
    held = make_dead_task(record, "held")
    locked, release = threading.Event(), threading.Event()

    def other_operator() -> None:
        try:
            with transaction.atomic():
                DeadTask.objects.select_for_update().get(pk=held.pk)
                locked.set()
                release.wait(30)
        finally:
            connection.close()

    thread = threading.Thread(target=other_operator)
    thread.start()
    try:
        assert locked.wait(30)
        out = run("requeue", "--all")
    finally:
        release.set()
        thread.join()
    assert out == (
        "requeued 1 dead tasks through the outbox; 1 cannot be sent again as they are (see the "
        "log): discard them; 1 were left alone: someone else was requeueing or discarding them "
        "at the same time (run this again to requeue those still dead)\n"
    )
    assert DeadTask.objects.get(pk=held.pk).status == "dead"
