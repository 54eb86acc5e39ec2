"""The admin of dead tasks, the outbox and the ledger, through Django's test client."""

from __future__ import annotations

import base64
import html
import pickle
import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from reliable_tasks import dead as dead_tasks
from reliable_tasks import testing
from reliable_tasks.admin import BATCH_SIZE
from reliable_tasks.models import (
    DeadStatus,
    DeadTask,
    IdempotencyKey,
    OutboxMessage,
    OutboxStatus,
    TaskAttempt,
)
from reliable_tasks.outbox import KEY_HEADER
from tests.support import effects, make_dead_task
from tests.testapp.tasks import charge, record

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "admin:reliable_tasks_deadtask_changelist"


def url(name: str, *args: Any) -> str:
    return reverse(f"admin:reliable_tasks_deadtask_{name}", args=args)


def login(*perms: str, superuser: bool = False) -> Client:
    """A client logged in as a staff user holding ``perms`` (codenames of reliable_tasks)."""
    name = f"user-{uuid.uuid4().hex[:8]}"
    if superuser:
        user = User.objects.create_superuser(name, f"{name}@example.com", "pw")
    else:
        user = User.objects.create_user(name, password="pw", is_staff=True)
        user.user_permissions.set(
            Permission.objects.filter(content_type__app_label="reliable_tasks", codename__in=perms)
        )
    client = Client()
    client.force_login(user)
    return client


def clones(template: DeadTask, count: int, **fields: Any) -> list[DeadTask]:
    """``count`` dead tasks like ``template``, each with its own task id (for bulk_create)."""
    made = []
    for _ in range(count):
        task_id = str(uuid.uuid4())
        values = {
            f.name: getattr(template, f.name)
            for f in DeadTask._meta.concrete_fields
            if f.name != "id"
        }
        values.update(
            task_id=task_id,
            idempotency_key=task_id,
            headers={**template.headers, "id": task_id},
            properties={**template.properties, "correlation_id": task_id},
            **fields,
        )
        made.append(DeadTask(**values))
    return made


def text(response: Any) -> str:
    assert response.status_code == 200, response.status_code
    return str(response.content.decode())


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


def assert_nothing_requeued(dead: DeadTask) -> None:
    """``dead`` is still dead, with no outbox row written and nothing logged for it."""
    dead.refresh_from_db()
    assert dead.status == DeadStatus.DEAD
    assert not OutboxMessage.objects.filter(status=OutboxStatus.PENDING).exists()
    assert not LogEntry.objects.exists()


def bound_of(page: str) -> str:
    """The newest dead task a bulk confirmation page counted, as its form sends it back."""
    found = re.search(r'name="up_to" value="(\d+)"', page)
    assert found is not None, "the confirmation page carries no bound"
    return found.group(1)


# -- the list ----------------------------------------------------------------------------------------


def test_the_list_shows_each_dead_task_and_a_summary_by_reason_and_task() -> None:
    make_dead_task(record, "a", exc_message="gateway timed out for order 7", attempts=3)
    make_dead_task(record, "b", reason="give_up", exc_type="tests.CardDeclined", attempts=1)
    make_dead_task(charge, 9, reason="give_up", exc_type="tests.CardDeclined", attempts=1)
    make_dead_task(record, "gone", status=DeadStatus.DISCARDED)
    page = text(login(superuser=True).get(reverse(CHANGELIST)))
    assert "gateway timed out for order 7" in page
    assert "GatewayTimeout" in page
    assert "CardDeclined" in page
    # The summary counts status "dead" only: three, not the discarded fourth.
    summary = page[page.index('id="rt-summary"') : page.index('id="changelist"')]
    assert "3 dead tasks waiting for a decision" in summary
    by_reason = summary[summary.index("rt-summary-by-reason") : summary.index("rt-summary-by-task")]
    assert re.search(r'rt-count">2</span><a href="[^"]*reason__exact=give_up', by_reason)
    assert re.search(r'rt-count">1</span><a href="[^"]*reason__exact=exhausted', by_reason)
    by_task = summary[summary.index("rt-summary-by-task") :]
    assert re.search(r'rt-count">2</span><a [^>]*>tests.testapp.tasks.record<', by_task)
    assert re.search(r'rt-count">1</span><a [^>]*>tests.testapp.tasks.charge<', by_task)


def test_the_list_costs_the_same_number_of_queries_for_3_or_60_dead_tasks() -> None:
    client = login(superuser=True)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            text(client.get(reverse(CHANGELIST)))
        return len(captured)

    template = make_dead_task(record, "x")
    DeadTask.objects.bulk_create(clones(template, 2))
    few = queries()
    DeadTask.objects.bulk_create(clones(template, 57, task_name="tests.testapp.tasks.other"))
    DeadTask.objects.bulk_create(clones(template, 1, reason="crash_loop"))
    assert queries() == few


def test_filters_narrow_by_task_reason_exception_status_and_date() -> None:
    client = login(superuser=True)
    old = make_dead_task(record, "old", last_failed_at=timezone.now() - timedelta(days=40))
    timeout = make_dead_task(record, "timeout")
    declined = make_dead_task(charge, 1, reason="give_up", exc_type="tests.CardDeclined")
    discarded = make_dead_task(record, "discarded", status=DeadStatus.DISCARDED)

    def listed(query: str) -> set[int]:
        page = text(client.get(reverse(CHANGELIST) + query))
        return {int(pk) for pk in re.findall(r"/deadtask/(\d+)/change/", page)}

    assert listed("?task=tests.testapp.tasks.charge") == {declined.pk}
    assert listed("?reason__exact=give_up") == {declined.pk}
    assert listed("?exception=tests.testapp.tasks.GatewayTimeout&status__exact=dead") == {
        old.pk,
        timeout.pk,
    }
    assert listed("?status__exact=discarded") == {discarded.pk}
    # The date filter's own link, as the sidebar offers it.
    sidebar = text(client.get(reverse(CHANGELIST)))
    past_week = re.search(r'href="(\?[^"]*last_failed_at__gte[^"]*)"[^>]*>Past 7 days', sidebar)
    assert past_week is not None
    assert listed(html.unescape(past_week.group(1))) == {timeout.pk, declined.pk, discarded.pk}
    # The filter sidebar offers each task and exception class once, and no blank choice.
    page = text(client.get(reverse(CHANGELIST)))
    assert page.count('href="?task=tests.testapp.tasks.record"') == 1
    assert 'href="?exception="' not in page


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("order-4711", {"args"}),
        ("coupon-XYZ", {"kwargs"}),
        ("connection reset by peer", {"message"}),
        ("charge:555", {"key"}),
    ],
)
def test_search_finds_dead_tasks_by_argument_text_message_and_key(
    term: str, expected: set[str]
) -> None:
    client = login(superuser=True)
    made = {
        "args": make_dead_task(record, "order-4711"),
        "kwargs": make_dead_task(record, "k", task_kwargs={"payload": {"note": "coupon-xyz"}}),
        "message": make_dead_task(record, "m", exc_message="Connection reset by peer"),
        "key": make_dead_task(charge, 555, idempotency_key="charge:555"),
    }
    page = text(client.get(reverse(CHANGELIST), {"q": term}))
    found = {int(pk) for pk in re.findall(r"/deadtask/(\d+)/change/", page)}
    assert found == {made[name].pk for name in expected}


def test_search_finds_a_dead_task_by_its_task_id() -> None:
    client = login(superuser=True)
    wanted = make_dead_task(record, "a")
    make_dead_task(record, "b")
    page = text(client.get(reverse(CHANGELIST), {"q": wanted.task_id}))
    assert set(re.findall(r"/deadtask/(\d+)/change/", page)) == {str(wanted.pk)}


# -- the detail ---------------------------------------------------------------------------------------


def test_the_detail_shows_arguments_headers_every_attempt_and_the_requeued_outbox_row() -> None:
    client = login(superuser=True)
    dead = make_dead_task(record, "receipt-17", attempts=3)
    page = text(client.get(url("change", dead.pk)))
    assert '<pre class="rt-json">[\n  &quot;receipt-17&quot;\n]</pre>' in page
    assert "&quot;task&quot;: &quot;tests.testapp.tasks.record&quot;" in page  # headers
    assert page.count('class="rt-attempt"') == 3
    assert page.count("Traceback (most recent call last)") == 3
    assert "on celery@worker-1" in page
    assert f"?task_id__exact={dead.task_id}" in page  # every outbox row of the task id
    assert 'id="rt-requeue-form"' in page
    assert 'id="rt-discard-form"' in page

    client.post(url("requeue", dead.pk), {"key": "keep"})
    dead.refresh_from_db()
    page = text(client.get(url("change", dead.pk)))
    outbox = reverse("admin:reliable_tasks_outboxmessage_change", args=[dead.requeued_outbox_id])
    assert f'Requeued as <a href="{outbox}">outbox row {dead.requeued_outbox_id}</a>' in page
    assert 'id="rt-requeue-form"' not in page  # requeued: nothing left to requeue
    assert text(client.get(outbox))  # and the outbox row opens


# -- requeue and discard one --------------------------------------------------------------------------


def test_requeue_sends_the_task_again_through_the_outbox_under_its_key_and_logs_it() -> None:
    client = login(superuser=True)
    dead = make_dead_task(record, "receipt-17")
    response = client.post(url("requeue", dead.pk), {"key": "keep"}, follow=True)
    assert any("Requeued" in m and "outbox row" in m for m in messages_of(response))
    dead.refresh_from_db()
    row = OutboxMessage.objects.get(pk=dead.requeued_outbox_id)
    assert (dead.status, row.status, row.task_id) == (
        DeadStatus.REQUEUED,
        OutboxStatus.PENDING,
        dead.task_id,
    )
    assert dead.status_changed_by == User.objects.get().username
    entry = LogEntry.objects.get(object_id=str(dead.pk))
    assert entry.action_flag == CHANGE
    assert f"Requeued through the outbox as row {row.pk}" in entry.get_change_message()
    assert "idempotency key kept" in entry.get_change_message()

    testing.run_enqueued()
    assert effects() == ["receipt-17"]


def test_requeue_with_a_renewed_key_runs_as_a_new_task_id() -> None:
    client = login(superuser=True)
    dead = make_dead_task(record, "again")
    client.post(url("requeue", dead.pk), {"key": "renew"})
    dead.refresh_from_db()
    row = OutboxMessage.objects.get(pk=dead.requeued_outbox_id)
    assert row.task_id != dead.task_id
    assert row.headers[KEY_HEADER].startswith(f"{dead.task_id}:requeue:")
    assert "new idempotency key" in LogEntry.objects.get().get_change_message()


def test_requeue_of_an_already_requeued_task_changes_nothing() -> None:
    client = login(superuser=True)
    dead = make_dead_task(record, "twice")
    client.post(url("requeue", dead.pk), {"key": "keep"})
    response = client.post(url("requeue", dead.pk), {"key": "keep"}, follow=True)
    assert any("already requeued" in m for m in messages_of(response))
    assert OutboxMessage.objects.filter(status=OutboxStatus.PENDING).count() == 1
    assert LogEntry.objects.count() == 1


def test_requeue_with_edited_arguments_sends_the_new_ones_and_keeps_the_old_for_the_record() -> (
    None
):
    client = login(superuser=True)
    dead = make_dead_task(record, "typo-in-key")
    form = text(client.get(url("requeue_edited", dead.pk)))
    assert "&quot;typo-in-key&quot;" in form  # the current arguments, ready to edit
    response = client.post(
        url("requeue_edited", dead.pk),
        {"args": '["fixed-key"]', "kwargs": '{"payload": {"n": 1}}', "key": "renew"},
    )
    assert response.status_code == 302
    dead.refresh_from_db()
    assert dead.status == DeadStatus.REQUEUED
    assert dead.args == ["typo-in-key"]  # the record keeps what failed
    message = LogEntry.objects.get().get_change_message()
    assert 'args ["fixed-key"]' in message
    assert 'were args ["typo-in-key"]' in message
    testing.run_enqueued()
    assert effects() == ["fixed-key"]
    assert testing.enqueued() == []


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ('["a",', "{}", "The positional arguments are not valid JSON: Expecting value (line 1, column 6)."),
        ('{"key": "a"}', "{}", "The positional arguments must be a JSON list, like [42, &quot;EUR&quot;]; this is a JSON object."),
        ('"a"', "{}", "must be a JSON list, like [42, &quot;EUR&quot;]; this is a JSON string."),
        ('["a"]', '["b"]', "The keyword arguments must be a JSON object, like {&quot;amount&quot;: 1250}; this is a JSON list."),
        ('["a"]', "{'single': 'quotes'}", "The keyword arguments are not valid JSON: Expecting property name enclosed in double quotes"),
        ("[NaN]", "{}", "NaN is not a JSON value; write a number or null."),
        # What the database cannot take, which failed the requeue with a server error.
        ("[" * 100_000, "{}", "nested too deeply to be read"),
        ('["\\ud800"]', "{}", "not valid Unicode text (a lone surrogate"),
        ('["a\\u0000b"]', "{}", "a NUL character (\\u0000), which the database cannot store"),
    ],
)  # fmt: skip
def test_the_edited_arguments_form_explains_what_is_wrong_and_requeues_nothing(
    args: str, kwargs: str, error: str
) -> None:
    client = login(superuser=True)
    dead = make_dead_task(record, "a")
    page = text(
        client.post(url("requeue_edited", dead.pk), {"args": args, "kwargs": kwargs, "key": "keep"})
    )
    assert error in page
    assert "nothing was requeued" in page
    assert_nothing_requeued(dead)


def test_the_edited_arguments_form_refuses_arguments_above_the_payload_limit(settings: Any) -> None:
    settings.RELIABLE_TASKS_MAX_PAYLOAD_BYTES = 1000
    client = login(superuser=True)
    dead = make_dead_task(record, "a")
    page = text(
        client.post(url("requeue_edited", dead.pk), {"args": f'["{"x" * 2000}"]', "key": "keep"})
    )
    assert "the limit is RELIABLE_TASKS_MAX_PAYLOAD_BYTES = 1,000 bytes" in page
    assert DeadTask.objects.get().status == DeadStatus.DEAD


def test_an_undecodable_message_cannot_be_requeued_the_admin_says_why_and_changes_nothing() -> None:
    client = login(superuser=True)
    raw = dead_tasks.capture_raw(
        dead_tasks.RawMessage(
            headers={"task": "tests.testapp.tasks.record", "id": "raw-1"},
            properties={},
            body=b"\xff\xfe not json",
            content_type="application/json",
            content_encoding="binary",
        ),
        reason="undecodable",
        error="cannot decode the body",
    )
    assert raw.content_encoding == "base64"
    response = client.post(url("requeue", raw.pk), {"key": "keep"}, follow=True)
    [message] = messages_of(response)
    assert message.startswith("Cannot requeue: dead task")
    assert "could not be decoded" in message
    assert message.endswith("Nothing was changed.")
    raw.refresh_from_db()
    assert raw.status == DeadStatus.DEAD
    assert not OutboxMessage.objects.exists()
    assert not LogEntry.objects.exists()
    # The detail page shows the raw body, base64, as text.
    assert base64.b64encode(b"\xff\xfe not json").decode() in text(
        client.get(url("change", raw.pk))
    )


def test_discard_keeps_the_dead_task_for_the_record_and_logs_it() -> None:
    client = login(superuser=True)
    dead = make_dead_task(record, "never")
    response = client.post(url("discard", dead.pk), follow=True)
    assert any("Discarded" in m for m in messages_of(response))
    dead.refresh_from_db()
    assert dead.status == DeadStatus.DISCARDED
    assert "Discarded (kept for the record" in LogEntry.objects.get().get_change_message()
    page = text(client.get(url("change", dead.pk)))
    assert 'id="rt-discard-form"' not in page
    assert 'id="rt-requeue-form"' in page  # a discarded task may still be requeued


# -- permissions: viewing is not acting -----------------------------------------------------------------


def test_a_view_only_user_sees_the_list_and_the_detail_but_is_offered_no_action() -> None:
    dead = make_dead_task(record, "look-only")
    client = login("view_deadtask")
    page = text(client.get(reverse(CHANGELIST)))
    assert f"/deadtask/{dead.pk}/change/" in page
    assert 'name="action"' not in page
    assert 'name="_selected_action"' not in page
    assert "rt-requeue-matching" not in page
    assert "rt-discard-matching" not in page
    detail = text(client.get(url("change", dead.pk)))
    assert "&quot;look-only&quot;" in detail
    assert 'id="rt-actions"' not in detail
    assert url("delete", dead.pk) not in detail
    assert client.get(url("requeue_edited", dead.pk)).status_code == 403


def _posts(dead: DeadTask) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "requeue": (url("requeue", dead.pk), {"key": "keep"}),
        "requeue edited": (url("requeue_edited", dead.pk), {"args": "[]", "kwargs": "{}", "key": "keep"}),
        "requeue matching": (url("requeue_matching"), {"confirm": "yes", "key": "keep", "up_to": dead.pk}),
        "requeue action": (reverse(CHANGELIST), {"action": "requeue_selected", "_selected_action": [dead.pk], "index": 0}),
        "discard": (url("discard", dead.pk), {}),
        "discard matching": (url("discard_matching"), {"confirm": "yes", "up_to": dead.pk}),
        "discard action": (reverse(CHANGELIST), {"action": "discard_selected", "_selected_action": [dead.pk], "confirm": "yes", "up_to": dead.pk}),
        "delete action": (reverse(CHANGELIST), {"action": "delete_selected", "_selected_action": [dead.pk], "post": "yes"}),
        "delete": (url("delete", dead.pk), {"post": "yes"}),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("perms", "refused"),
    [
        (("view_deadtask",), {"requeue", "requeue edited", "requeue matching", "requeue action",
                              "discard", "discard matching", "discard action", "delete action", "delete"}),
        (("view_deadtask", "requeue_deadtask"), {"discard", "discard matching", "discard action",
                                                 "delete action", "delete"}),
        (("view_deadtask", "discard_deadtask"), {"requeue", "requeue edited", "requeue matching",
                                                 "requeue action", "delete action", "delete"}),
        (("view_deadtask", "delete_deadtask"), {"requeue", "requeue edited", "requeue matching",
                                                "requeue action", "discard", "discard matching",
                                                "discard action"}),
    ],
)  # fmt: skip
def test_acting_without_the_permission_is_refused_on_the_server(
    perms: tuple[str, ...], refused: set[str]
) -> None:
    dead = make_dead_task(record, "guarded")
    client = login(*perms)
    for name, (path, data) in _posts(dead).items():
        if name in refused:
            assert client.post(path, data).status_code == 403, name
    dead.refresh_from_db()
    assert dead.status == DeadStatus.DEAD
    assert not OutboxMessage.objects.filter(status=OutboxStatus.PENDING).exists()
    assert not LogEntry.objects.exists()


def test_the_requeue_permission_alone_offers_requeue_but_neither_discard_nor_delete() -> None:
    dead = make_dead_task(record, "r")
    client = login("view_deadtask", "requeue_deadtask")
    page = text(client.get(reverse(CHANGELIST)))
    assert '<option value="requeue_selected">' in page
    assert "discard_selected" not in page
    assert "delete_selected" not in page
    assert "rt-requeue-matching" in page
    assert "rt-discard-matching" not in page
    detail = text(client.get(url("change", dead.pk)))
    assert 'id="rt-requeue-form"' in detail
    assert 'id="rt-discard-form"' not in detail
    assert url("delete", dead.pk) not in detail


def test_delete_is_djangos_own_and_is_logged() -> None:
    dead = make_dead_task(record, "d")
    client = login("view_deadtask", "delete_deadtask")
    detail = text(client.get(url("change", dead.pk)))
    assert url("delete", dead.pk) in detail
    client.post(url("delete", dead.pk), {"post": "yes"})
    assert not DeadTask.objects.exists()
    assert LogEntry.objects.get().action_flag == DELETION


# -- bulk ----------------------------------------------------------------------------------------------


def test_bulk_requeue_of_a_filter_of_1000_dead_tasks_covers_every_page_in_batches() -> None:
    client = login(superuser=True)
    template = make_dead_task(record, "bulk")
    DeadTask.objects.bulk_create(clones(template, 999))
    other_reason = make_dead_task(record, "left-alone", reason="crash_loop")
    already = make_dead_task(record, "already", status=DeadStatus.REQUEUED)
    query = "?reason__exact=exhausted"
    page = text(client.get(url("requeue_matching") + query))
    assert "1001 in all" in page  # the filter matches the requeued one too
    assert "<strong>1000</strong> dead tasks will be requeued through the outbox" in page
    assert f"in 2 batches of up to {BATCH_SIZE}" in page
    assert "1 of them is already requeued or discarded" in page
    assert not OutboxMessage.objects.filter(status=OutboxStatus.PENDING).exists()  # not yet

    response = client.post(
        url("requeue_matching") + query, {"confirm": "yes", "key": "keep", "up_to": bound_of(page)}
    )
    assert response.status_code == 302
    assert response["Location"].endswith(reverse(CHANGELIST) + query)
    assert DeadTask.objects.filter(reason="exhausted", status=DeadStatus.REQUEUED).count() == 1001
    assert OutboxMessage.objects.filter(status=OutboxStatus.PENDING).count() == 1000
    other_reason.refresh_from_db()
    already.refresh_from_db()
    assert other_reason.status == DeadStatus.DEAD
    assert already.requeued_outbox_id is None  # untouched, not requeued twice
    assert LogEntry.objects.filter(action_flag=CHANGE).count() == 1000
    assert "Requeued 1,000 dead tasks through the outbox." in messages_of(
        client.get(reverse(CHANGELIST))
    )


def test_bulk_requeue_honours_the_search_too() -> None:
    client = login(superuser=True)
    wanted = make_dead_task(record, "needle-1")
    make_dead_task(record, "haystack")
    page = text(client.get(url("requeue_matching") + "?q=needle"))
    client.post(
        url("requeue_matching") + "?q=needle",
        {"confirm": "yes", "key": "renew", "up_to": bound_of(page)},
    )
    assert set(
        DeadTask.objects.filter(status=DeadStatus.REQUEUED).values_list("pk", flat=True)
    ) == {wanted.pk}


def test_bulk_discard_of_the_selection_confirms_first_then_discards_only_the_selection() -> None:
    client = login(superuser=True)
    chosen = [make_dead_task(record, f"chosen-{n}") for n in range(3)]
    spared = make_dead_task(record, "spared")
    selection = [d.pk for d in chosen]
    page = text(
        client.post(
            reverse(CHANGELIST),
            {"action": "discard_selected", "_selected_action": selection, "index": 0},
        )
    )
    assert "Scope: the 3 selected dead tasks." in page
    assert "<strong>3</strong> dead tasks will be discarded" in page
    assert not DeadTask.objects.filter(status=DeadStatus.DISCARDED).exists()
    for pk in selection:
        assert f'name="_selected_action" value="{pk}"' in page

    response = client.post(
        reverse(CHANGELIST),
        {
            "action": "discard_selected",
            "_selected_action": selection,
            "confirm": "yes",
            "up_to": bound_of(page),
        },
    )
    assert response.status_code == 302
    assert set(
        DeadTask.objects.filter(status=DeadStatus.DISCARDED).values_list("pk", flat=True)
    ) == set(selection)
    spared.refresh_from_db()
    assert spared.status == DeadStatus.DEAD
    assert LogEntry.objects.count() == 3


def test_the_requeue_action_with_select_across_takes_every_page_of_the_filter() -> None:
    client = login(superuser=True)
    template = make_dead_task(record, "across")
    DeadTask.objects.bulk_create(clones(template, 149))
    make_dead_task(charge, 1)  # another task: outside the filter
    first_page = list(
        DeadTask.objects.filter(task_name=template.task_name).values_list("pk", flat=True)[:100]
    )
    query = "?task=tests.testapp.tasks.record"
    data = {"action": "requeue_selected", "_selected_action": first_page, "select_across": "1"}
    page = text(client.post(reverse(CHANGELIST) + query, {**data, "index": 0}))
    assert "<strong>150</strong> dead tasks will be requeued" in page
    client.post(
        reverse(CHANGELIST) + query,
        {**data, "confirm": "yes", "key": "keep", "up_to": bound_of(page)},
    )
    assert DeadTask.objects.filter(status=DeadStatus.REQUEUED).count() == 150
    assert DeadTask.objects.get(status=DeadStatus.DEAD).task_name == "tests.testapp.tasks.charge"


def test_bulk_requeue_leaves_messages_it_cannot_send_and_says_how_many() -> None:
    client = login(superuser=True)
    make_dead_task(record, "fine")
    dead_tasks.capture_raw(
        dead_tasks.RawMessage(headers={}, properties={}, body=b"\x00\xff", content_type="application/json",
                              content_encoding="binary"),
        reason="undecodable", error="garbage",
    )  # fmt: skip
    page = text(client.get(url("requeue_matching")))
    assert "<strong>1</strong> dead task will be requeued" in page
    assert "1 cannot be requeued as it is" in page
    client.post(url("requeue_matching"), {"confirm": "yes", "key": "keep", "up_to": bound_of(page)})
    assert dict(DeadTask.objects.values_list("reason", "status")) == {
        "exhausted": DeadStatus.REQUEUED,
        "undecodable": DeadStatus.DEAD,
    }


@pytest.mark.parametrize(
    ("operation", "status", "done"),
    [("requeue", DeadStatus.REQUEUED, "Requeued"), ("discard", DeadStatus.DISCARDED, "Discarded")],
)
def test_bulk_on_a_filter_leaves_dead_tasks_that_arrived_after_the_confirmation_page(
    operation: str, status: str, done: str
) -> None:
    client = login(superuser=True)
    counted = [make_dead_task(record, f"counted-{n}") for n in range(2)]
    query = "?reason__exact=exhausted"
    page = text(client.get(url(f"{operation}_matching") + query))
    assert "<strong>2</strong> dead tasks will be" in page
    late = make_dead_task(record, "arrived-while-the-operator-read")  # matches the filter too
    response = client.post(
        url(f"{operation}_matching") + query,
        {"confirm": "yes", "key": "keep", "up_to": bound_of(page)},
        follow=True,
    )
    assert {d.pk: d.status for d in DeadTask.objects.all()} == {
        **{d.pk: status for d in counted},
        late.pk: DeadStatus.DEAD,
    }
    assert LogEntry.objects.count() == 2
    said = messages_of(response)
    assert said[0].startswith(f"{done} 2 dead tasks")
    assert said[1] == (
        "1 more dead task matching arrived after the confirmation page was shown; "
        "it was left as it is, for a next look."
    )


def test_a_bulk_confirmation_posted_without_its_bound_changes_nothing_and_asks_again() -> None:
    client = login(superuser=True)
    make_dead_task(record, "x")
    page = text(client.post(url("discard_matching"), {"confirm": "yes"}))
    assert "did not say which dead tasks it counted; nothing was changed" in page
    assert bound_of(page)  # the page asks again, with a bound this time
    assert DeadTask.objects.get().status == DeadStatus.DEAD


def test_a_bulk_confirmation_with_nothing_to_do_offers_no_button() -> None:
    client = login(superuser=True)
    make_dead_task(record, "x", status=DeadStatus.DISCARDED)
    page = text(client.get(url("discard_matching")))
    assert 'id="rt-nothing"' in page
    assert 'name="confirm"' not in page


# -- escaping ------------------------------------------------------------------------------------------


def test_everything_a_task_or_an_error_contains_is_escaped() -> None:
    client = login(superuser=True)
    payload = "<script>alert(1)</script>"
    dead = make_dead_task(
        record,
        payload,
        exc_type="<b>evil.Type</b>",
        exc_message='<img src=x onerror="alert(2)">',
        task_name="<i>tests.evil</i>",
        idempotency_key="<u>key</u>",
    )
    dead.attempts[0]["traceback"] = "<script>alert(3)</script>"
    dead.attempts[0]["worker"] = "<svg onload=alert(4)>"
    dead.save()
    pages = {
        "list": text(client.get(reverse(CHANGELIST))),
        "detail": text(client.get(url("change", dead.pk))),
        "edit": text(client.get(url("requeue_edited", dead.pk))),
        "confirm": text(client.get(url("requeue_matching"))),
        "search": text(client.get(reverse(CHANGELIST), {"q": payload})),
    }
    for name, page in pages.items():
        for raw in (
            "<script>alert",
            "<img src=x",
            "<b>evil",
            "<i>tests.evil",
            "<svg onload",
            "<u>key",
        ):
            assert raw not in page, (name, raw)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages["detail"]
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in pages["detail"]
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in pages["list"]
    assert "&lt;i&gt;tests.evil&lt;/i&gt;" in pages["list"]
    assert f"/deadtask/{dead.pk}/change/" in pages["search"]  # found by its argument text


# -- the outbox and the ledger ---------------------------------------------------------------------------


def test_the_outbox_admin_is_read_only_and_shows_the_backlog_and_its_oldest_due_age() -> None:
    client = login(superuser=True)
    record.delay("due")
    record.apply_async(("later",), countdown=3600)
    OutboxMessage.objects.filter(status=OutboxStatus.PENDING, due_at__lte=timezone.now()).update(
        due_at=timezone.now() - timedelta(minutes=12)
    )
    changelist = reverse("admin:reliable_tasks_outboxmessage_changelist")
    page = text(client.get(changelist))
    assert (
        "<strong>2</strong> pending, 1 due now; the oldest due row has waited <strong>12 min</strong>."
        in page
    )
    assert "No relay has reported a heartbeat." in page
    assert "Add outbox message" not in page
    assert 'name="action"' not in page
    assert text(
        client.get(changelist, {"status__exact": "pending", "task": "tests.testapp.tasks.record"})
    )
    row = OutboxMessage.objects.first()
    assert row is not None
    detail = text(client.get(reverse("admin:reliable_tasks_outboxmessage_change", args=[row.pk])))
    assert 'name="_save"' not in detail
    assert "/delete/" not in detail
    assert client.get(reverse("admin:reliable_tasks_outboxmessage_add")).status_code == 403
    assert (
        client.post(
            reverse("admin:reliable_tasks_outboxmessage_delete", args=[row.pk]), {"post": "yes"}
        ).status_code
        == 403
    )
    assert OutboxMessage.objects.count() == 2


def test_the_ledger_and_attempt_admins_are_read_only_and_searchable() -> None:
    client = login(superuser=True)
    charge.delay(42, amount=5)
    testing.run_enqueued()
    TaskAttempt.objects.create(
        task_id="t-1", task_name="tests.testapp.tasks.record", number=1, outcome="failed",
        exc_type="ValueError", message="boom", traceback="Traceback <here>",
    )  # fmt: skip
    key = IdempotencyKey.objects.get()
    ledger = reverse("admin:reliable_tasks_idempotencykey_changelist")
    page = text(client.get(ledger, {"q": "charge:42"}))
    assert f"/idempotencykey/{key.pk}/change/" in page
    assert not re.search(
        r"/idempotencykey/\d+/change/", text(client.get(ledger, {"q": "charge:43"}))
    )
    detail = text(client.get(reverse("admin:reliable_tasks_idempotencykey_change", args=[key.pk])))
    assert "&quot;charged&quot;: 5" in detail
    assert 'name="_save"' not in detail
    attempt = TaskAttempt.objects.get()
    page = text(client.get(reverse("admin:reliable_tasks_taskattempt_changelist"), {"q": "boom"}))
    assert f"/taskattempt/{attempt.pk}/change/" in page
    detail = text(client.get(reverse("admin:reliable_tasks_taskattempt_change", args=[attempt.pk])))
    assert "Traceback &lt;here&gt;" in detail
    for model in ("idempotencykey", "taskattempt", "relayheartbeat"):
        assert client.get(reverse(f"admin:reliable_tasks_{model}_add")).status_code == 403


# -- bodies that must not be decoded, and arguments the database cannot take -------------------------


class _RunsCode:
    """Unpickled, this touches ``path``: the proof that a pickle body was decoded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"import pathlib; pathlib.Path({self.path!r}).touch()",))


def test_a_pickle_body_is_never_unpickled_not_at_capture_display_or_requeue(
    tmp_path: Any,
) -> None:
    """Anyone who can publish to a queue could send a message for an unknown task with a
    pickle body: capturing it as a dead task, showing it and its requeued outbox row in the
    admin, and requeueing it with edited arguments leave it undecoded."""
    ran = tmp_path / "unpickled"
    body = pickle.dumps([[_RunsCode(str(ran))], {}, {}], protocol=0)
    raw = dead_tasks.capture_raw(
        dead_tasks.RawMessage(
            headers={"task": "tests.testapp.tasks.record", "id": "pickled-1"},
            properties={},
            body=body,
            content_type="application/x-python-serialize",
            content_encoding="utf-8",  # protocol 0 is ASCII: kept as text, as a JSON body is
        ),
        reason="unregistered",
        error="no such task",
    )
    assert (raw.args, raw.kwargs) == (None, None)
    client = login(superuser=True)
    assert "pickled-1" in text(client.get(url("change", raw.pk)))
    response = client.post(
        url("requeue_edited", raw.pk), {"args": '["a"]', "kwargs": "{}", "key": "keep"}
    )
    assert "which is not decoded here (only JSON, msgpack and YAML are" in " ".join(
        messages_of(response) or [text(response)]
    )
    raw.refresh_from_db()
    assert raw.status == DeadStatus.DEAD
    # Requeued as it is, its outbox row's page shows the body undecoded too.
    client.post(url("requeue", raw.pk), {"key": "keep"})
    row = OutboxMessage.objects.get(task_id="pickled-1")
    detail = text(client.get(reverse("admin:reliable_tasks_outboxmessage_change", args=[row.pk])))
    assert "cannot decode the body" in detail
    assert "Refusing to deserialize" in html.unescape(detail)
    assert not ran.exists()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ('{"not": "a list"', "is not valid 'application/json'"),
        ('[["a"], {}]', "is not a Celery task message (args, kwargs, embed)"),
    ],
)
def test_requeue_with_edited_arguments_of_a_body_that_is_no_task_message_says_why(
    body: str, why: str
) -> None:
    """Stored as text (valid UTF-8), such a body is offered the edited requeue; the admin
    says why it cannot take new arguments instead of failing with a server error."""
    dead = make_dead_task(record, "a")
    DeadTask.objects.filter(pk=dead.pk).update(body=body)
    client = login(superuser=True)
    response = client.post(
        url("requeue_edited", dead.pk), {"args": '["b"]', "kwargs": "{}", "key": "keep"}
    )
    page = " ".join(messages_of(response)) or text(response)
    assert why in page
    assert "Requeue it as it is, or discard it." in page
    assert_nothing_requeued(dead)


@pytest.mark.parametrize("term", ["Zürich", "C:\\tmp", 'say "hi"', '"say \\"hi\\""'])
def test_search_finds_arguments_with_characters_json_escapes(term: str) -> None:
    """JSON escapes quotes and backslashes, and SQLite's JSON text writes non-ASCII letters
    as \\u escapes: a search for the text as the task got it finds it all the same."""
    client = login(superuser=True)
    wanted = make_dead_task(record, 'to Zürich via C:\\tmp, say "hi"')
    make_dead_task(record, "elsewhere")
    page = text(client.get(reverse(CHANGELIST), {"q": term}))
    assert set(re.findall(r"/deadtask/(\d+)/change/", page)) == {str(wanted.pk)}


def test_acting_on_dead_tasks_takes_the_view_permission_too() -> None:
    """The confirmation page of a bulk action lists dead tasks: a user who may requeue or
    discard but not view them is refused, as Django refuses its own views."""
    dead = make_dead_task(record, "unseen")
    client = login("requeue_deadtask", "discard_deadtask")
    for name, args in (
        ("requeue_matching", ()),
        ("discard_matching", ()),
        ("requeue_edited", (dead.pk,)),
    ):
        assert client.get(url(name, *args)).status_code == 403, name
    assert client.post(url("requeue", dead.pk), {"key": "keep"}).status_code == 403
    dead.refresh_from_db()
    assert dead.status == DeadStatus.DEAD
    assert not OutboxMessage.objects.filter(status=OutboxStatus.PENDING).exists()


def test_all_matching_from_a_later_page_takes_every_page_even_once_that_page_is_gone() -> None:
    """The link carries the list's page number; the matching dead tasks are all pages', and a
    page that no longer exists (others acted meanwhile) must not make the filters invalid."""
    client = login(superuser=True)
    template = make_dead_task(record, "paged")
    DeadTask.objects.bulk_create(clones(template, 150))
    query = "?reason__exact=exhausted&p=2"  # 100 a page: page 2 exists now
    page = text(client.get(url("requeue_matching") + query))
    assert "<strong>151</strong> dead tasks will be requeued through the outbox" in page
    DeadTask.objects.exclude(pk=template.pk).delete()  # page 2 is gone
    response = client.post(
        url("requeue_matching") + query, {"confirm": "yes", "key": "keep", "up_to": bound_of(page)}
    )
    assert response.status_code == 302
    assert response["Location"].endswith(reverse(CHANGELIST) + "?reason__exact=exhausted")
    template.refresh_from_db()
    assert template.status == DeadStatus.REQUEUED


def test_a_requeue_from_a_page_that_showed_the_task_dead_is_refused_once_another_discarded_it() -> (
    None
):
    """Two operators: one discards ("it will not run"), the other, on a page loaded before,
    requeues. The requeue was asked for a dead task: it is refused and says why; from a page
    that shows it discarded, it goes ahead."""
    dead = make_dead_task(record, "contested")
    bob = login(superuser=True)
    page = text(bob.get(url("change", dead.pk)))
    assert 'name="seen_status" value="dead"' in page
    alice = login(superuser=True)
    alice.post(url("discard", dead.pk))
    response = bob.post(
        url("requeue", dead.pk), {"key": "keep", "seen_status": "dead"}, follow=True
    )
    [message] = messages_of(response)
    assert " was discarded by user-" in message
    assert "after your page showed it dead; nothing was changed" in message
    dead.refresh_from_db()
    assert dead.status == DeadStatus.DISCARDED
    assert not OutboxMessage.objects.filter(status=OutboxStatus.PENDING).exists()
    # Seen discarded, asked again: requeued.
    assert 'name="seen_status" value="discarded"' in text(bob.get(url("change", dead.pk)))
    bob.post(url("requeue", dead.pk), {"key": "keep", "seen_status": "discarded"})
    dead.refresh_from_db()
    assert dead.status == DeadStatus.REQUEUED
