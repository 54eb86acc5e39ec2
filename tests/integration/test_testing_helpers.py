"""reliable_tasks.testing: a user's tests see and run the outbox with no broker."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import chain
from celery.exceptions import Ignore
from django.db import transaction

from reliable_tasks import testing
from tests.testapp.models import Effect
from tests.testapp.tasks import charge, ignores_itself, pay, record, replaced, write_then_fail

pytestmark = pytest.mark.django_db(transaction=True)


def test_assert_enqueued_finds_a_committed_task_by_its_arguments() -> None:
    with transaction.atomic():
        record.delay("a", payload={"n": (1, 2)})
    [entry] = testing.assert_enqueued(record, args=("a",), kwargs={"payload": {"n": (1, 2)}})
    assert entry.kwargs == {"payload": {"n": [1, 2]}}
    testing.assert_enqueued("tests.testapp.tasks.record", count=1)


def test_assert_enqueued_says_what_is_there_when_it_fails() -> None:
    record.delay("a")
    with pytest.raises(
        AssertionError,
        match=r"args=\('b',\).* is not in the outbox; pending there: .*record\(args=\['a'\]",
    ):
        testing.assert_enqueued(record, args=("b",))
    with pytest.raises(AssertionError, match="in the outbox 1 times, not 2"):
        testing.assert_enqueued(record, count=2)


def test_run_enqueued_runs_tasks_chains_and_their_follow_ups_once() -> None:
    chain(record.si("c1"), record.si("c2")).delay()
    charge.delay(5, amount=1)
    charge.delay(5, amount=1)
    results = testing.run_enqueued()
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["c1", "c2", "charge:5"]
    assert results.count({"order": 5, "charged": 1, "key": "charge:5"}) == 2
    assert testing.enqueued() == []


def test_run_enqueued_keeps_a_chain_through_a_retry_and_continues_it_once_for_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a worker: a step that fails once is retried with the rest of its chain, and a
    duplicate of a business key, answered with the stored result, does not continue its chain
    a second time."""
    monkeypatch.setattr("tests.testapp.tasks.SIGNAL_DIR", tmp_path)
    chain(pay.si(7, "fail-once"), record.si("after-the-retry")).delay()
    chain(charge.si(9, amount=1), record.si("after-charge")).delay()
    chain(charge.si(9, amount=1), record.si("after-charge")).delay()
    testing.run_enqueued()
    keys = sorted(Effect.objects.values_list("key", flat=True))
    assert keys == ["after-charge", "after-the-retry", "charge:9", "pay:7"]
    assert testing.enqueued() == []


def test_run_enqueued_runs_a_chain_after_a_replaced_step_once_and_goes_on_after_ignore() -> None:
    """A step that replaces itself hands the rest of its chain and its callbacks to the
    replacement, which runs them: once. A task that ends with Ignore is a result, not an error,
    and the rows after it run."""
    chain(replaced.si("r"), record.si("after-the-replacement")).apply_async(
        link=record.si("linked")
    )
    ignores_itself.delay("ignored")
    record.delay("plain")
    results = testing.run_enqueued()
    keys = sorted(Effect.objects.values_list("key", flat=True))
    assert keys == [
        "after-the-replacement", "ignored", "linked", "plain", "r:before", "r:replacement"
    ]  # fmt: skip
    assert [str(r) for r in results if isinstance(r, Ignore)] == ["ignored is done with"]
    assert testing.enqueued() == []


def test_run_enqueued_leaves_future_rows_when_asked() -> None:
    record.apply_async(("later",), countdown=3600)
    record.delay("now")
    assert testing.run_enqueued(include_future=False) == ["now"]
    assert [e.args for e in testing.enqueued()] == [("later",)]


def test_run_enqueued_raises_the_task_error() -> None:
    write_then_fail.delay("boom")
    with pytest.raises(ValueError, match="boom failed after its write"):
        testing.run_enqueued()
    assert Effect.objects.count() == 0
