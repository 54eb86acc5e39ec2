"""Django admin: inspect, requeue and discard dead tasks; read-only views of the outbox and ledger.

Viewing is not acting. Users with ``view_deadtask`` see dead tasks; requeueing needs
``reliable_tasks.requeue_deadtask``, discarding ``reliable_tasks.discard_deadtask`` and deleting
``delete_deadtask``. Each is checked on the server, not only by hiding buttons, and every act is
written to the admin's history. Dead tasks are never edited in place: their rows are the record.

Anything a task or an error carries (arguments, messages, tracebacks, even task names) is
untrusted text: it reaches HTML only through template auto-escaping or ``format_html``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import PAGE_VAR, ChangeList
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.db import models, transaction
from django.db.models import Count, Max, Min, Q, QuerySet, TextField
from django.db.models.functions import Cast
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import Truncator, smart_split, unescape_string_literal

from . import dead
from .conf import conf
from .forms import BulkBoundForm, EditedArgumentsForm, RequeueForm
from .models import (
    DeadReason,
    DeadStatus,
    DeadTask,
    IdempotencyKey,
    OutboxMessage,
    OutboxStatus,
    RelayHeartbeat,
    TaskAttempt,
)

_M = TypeVar("_M", bound=models.Model)

if TYPE_CHECKING:
    _ModelAdmin = admin.ModelAdmin
else:

    class _ModelAdmin(admin.ModelAdmin):
        # django-stubs declares ModelAdmin generic over its model; Django's class takes no
        # parameter at runtime, and the package cannot require django_stubs_ext's monkeypatch.
        def __class_getitem__(cls, _model):
            return cls


#: Dead tasks requeued or discarded per transaction by the bulk actions.
BATCH_SIZE = 500
#: Dead tasks shown by name on a bulk confirmation page.
SAMPLE_SIZE = 10
#: Task names listed in the summary above the dead-task list.
SUMMARY_TASKS = 10

Operation = Literal["requeue", "discard"]


# -- shared pieces ----------------------------------------------------------------------------------


def pretty_json(value: Any) -> SafeString:
    """JSON indented in a <pre>, escaped: arguments and headers are untrusted text."""
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    return format_html('<pre class="rt-json">{}</pre>', text)


def preformatted(text: str) -> SafeString | str:
    return format_html('<pre class="rt-text">{}</pre>', text) if text else "-"


def short_age(delta: timedelta) -> str:
    """An age an operator reads at a glance: "45 s", "12 min", "3.5 h", "2.0 days"."""
    seconds = max(delta.total_seconds(), 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def breakable(dotted: str) -> SafeString:
    """A dotted name that may wrap after its dots (and nowhere else) in a narrow column."""
    *head, last = dotted.split(".")
    return format_html("{}{}", format_html_join("", "{}.<wbr>", ((part,) for part in head)), last)


def compact_time(moment: datetime) -> str:
    """A timestamp that fits a list column: "2025-03-01 14:02:33" in the current time zone."""
    return f"{timezone.localtime(moment):%Y-%m-%d %H:%M:%S}"


class ValuesFilter(admin.SimpleListFilter):
    """A filter offering each distinct non-blank value of one column (one query)."""

    field_name = ""

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> list[tuple[str, str]]:
        values = (
            model_admin.get_queryset(request)
            .exclude(**{self.field_name: ""})
            .order_by(self.field_name)
            .values_list(self.field_name, flat=True)
            .distinct()
        )
        return [(str(v), str(v)) for v in values]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(**{self.field_name: value}) if value else queryset


class TaskNameFilter(ValuesFilter):
    title = "task"
    parameter_name = "task"
    field_name = "task_name"


class ExceptionFilter(ValuesFilter):
    title = "exception class"
    parameter_name = "exception"
    field_name = "exc_type"


class LastFailureFilter(admin.DateFieldListFilter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.title = "last failure"


class ReadOnlyAdmin(_ModelAdmin[_M]):
    """Rows the package writes; the admin shows them and changes nothing."""

    list_per_page = 100

    def get_queryset(self, request: HttpRequest) -> QuerySet[_M]:
        return super().get_queryset(request).using(conf.DATABASE)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: _M | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: _M | None = None) -> bool:
        return False


# -- dead tasks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One recorded attempt of a dead task, ready for the template."""

    number: Any
    outcome: str
    exc_type: str
    message: str
    traceback: str
    worker: str
    started_at: datetime | None
    ended_at: datetime | None

    @property
    def duration(self) -> str:
        if self.started_at is None or self.ended_at is None:
            return ""
        return f"{(self.ended_at - self.started_at).total_seconds():.3f} s"


def attempts_for_display(recorded: Any) -> list[Attempt]:
    """``DeadTask.attempts`` as template-ready objects; tolerant of missing keys."""
    if not isinstance(recorded, list):
        return []
    return [
        Attempt(
            number=a.get("number", i),
            outcome=str(a.get("outcome") or ""),
            exc_type=str(a.get("exc_type") or ""),
            message=str(a.get("message") or ""),
            traceback=str(a.get("traceback") or ""),
            worker=str(a.get("worker") or ""),
            started_at=_when(a.get("started_at")),
            ended_at=_when(a.get("ended_at")),
        )
        for i, a in enumerate(recorded, start=1)
        if isinstance(a, dict)
    ]


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_datetime(value)
    except ValueError:
        return None


class _MessageFields:
    """The AMQP headers and properties of a stored message, as readable JSON."""

    @admin.display(description="headers")
    def headers_json(self, obj: DeadTask | OutboxMessage) -> SafeString:
        return pretty_json(obj.headers)

    @admin.display(description="properties")
    def properties_json(self, obj: DeadTask | OutboxMessage) -> SafeString:
        return pretty_json(obj.properties)


#: The dead task's columns the admin's search looks in, beside its arguments.
_SEARCHED_COLUMNS = ("task_id", "idempotency_key", "task_name", "exc_type", "exc_message")


@admin.register(DeadTask)
class DeadTaskAdmin(_MessageFields, ReadOnlyAdmin[DeadTask]):
    """Dead tasks: what failed and how, and the acts that send them again or put them aside."""

    list_display = (
        "task",
        "reason",
        "exception",
        "attempts_column",
        "first_failure",
        "last_failure",
        "status",
    )
    list_filter = (
        TaskNameFilter,
        "reason",
        ExceptionFilter,
        "status",
        ("last_failed_at", LastFailureFilter),
    )
    # Searched by get_search_results, with the arguments' JSON as text.
    search_fields = _SEARCHED_COLUMNS
    search_help_text = (
        "Task id, idempotency key, task name, exception class or message, or text in the arguments."
    )
    actions = ("requeue_selected", "discard_selected", "delete_selected")
    readonly_fields = (
        "task_name",
        "task_id",
        "status_line",
        "reason",
        "exception_detail",
        "idempotency_key",
        "attempt_count",
        "first_failed_at",
        "last_failed_at",
        "outbox_rows",
        "args_json",
        "kwargs_json",
        "queue",
        "exchange",
        "routing_key",
        "headers_json",
        "properties_json",
        "content_type",
        "content_encoding",
        "raw_body",
    )
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "task_name",
                    "task_id",
                    "status_line",
                    "reason",
                    "exception_detail",
                    "idempotency_key",
                    "attempt_count",
                    ("first_failed_at", "last_failed_at"),
                    "outbox_rows",
                )
            },
        ),
        ("Arguments", {"fields": ("args_json", "kwargs_json")}),
        (
            "Message",
            {
                "classes": ("collapse",),
                "description": "The message as it was published; a requeue sends it again.",
                "fields": (
                    ("queue", "exchange", "routing_key"),
                    "headers_json",
                    "properties_json",
                    ("content_type", "content_encoding"),
                    "raw_body",
                ),
            },
        ),
    )
    change_list_template = "admin/reliable_tasks/deadtask/change_list.html"
    change_form_template = "admin/reliable_tasks/deadtask/change_form.html"

    # -- permissions: viewing is not acting ----------------------------------------------------------

    def has_requeue_permission(self, request: HttpRequest, obj: DeadTask | None = None) -> bool:
        return self._has_perm(request, "requeue")

    def has_discard_permission(self, request: HttpRequest, obj: DeadTask | None = None) -> bool:
        return self._has_perm(request, "discard")

    def has_delete_permission(self, request: HttpRequest, obj: DeadTask | None = None) -> bool:
        return self._has_perm(request, "delete")

    def _has_perm(self, request: HttpRequest, action: str) -> bool:
        codename = get_permission_codename(action, self.opts)
        return bool(request.user.has_perm(f"{self.opts.app_label}.{codename}"))

    def _require(self, request: HttpRequest, action: str) -> None:
        """Acting takes the action's permission and the view permission: the pages of an
        action show dead tasks (a bulk confirmation lists some)."""
        if not self.has_view_permission(request):
            raise PermissionDenied("you may not view dead tasks")
        if not self._has_perm(request, action):
            raise PermissionDenied(f"you may view dead tasks but not {action} them")

    # -- the list -------------------------------------------------------------------------------------

    @admin.display(description="task", ordering="task_name")
    def task(self, obj: DeadTask) -> SafeString | str:
        return breakable(obj.task_name) if obj.task_name else "(no task name)"

    @admin.display(description="exception", ordering="exc_type")
    def exception(self, obj: DeadTask) -> SafeString | str:
        """The class's own name in bold, then the message: what Python would print, shortened."""
        if not obj.exc_type and not obj.exc_message:
            return "-"
        return format_html(
            '<strong title="{}">{}</strong> {}',
            obj.exc_type,
            obj.exc_type.rpartition(".")[2],
            Truncator(obj.exc_message.replace("\n", " ")).chars(100),
        )

    @admin.display(description="attempts", ordering="attempt_count")
    def attempts_column(self, obj: DeadTask) -> int:
        return obj.attempt_count

    @admin.display(description="first failure", ordering="first_failed_at")
    def first_failure(self, obj: DeadTask) -> str:
        return compact_time(obj.first_failed_at)

    @admin.display(description="last failure", ordering="last_failed_at")
    def last_failure(self, obj: DeadTask) -> str:
        return compact_time(obj.last_failed_at)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[DeadTask], search_term: str
    ) -> tuple[QuerySet[DeadTask], bool]:
        """Django's search (every word found in one of the fields), where a word is also
        looked for in the arguments' JSON as text, as each database writes it there: with its
        quotes and backslashes escaped, and its other characters as they are (PostgreSQL) or as
        \\u escapes (SQLite), so that ``Zürich`` or ``C:\\tmp`` finds the arguments that hold it."""
        if not search_term:
            return super().get_search_results(request, queryset, search_term)
        queryset = queryset.annotate(
            args_text=Cast("args", TextField()), kwargs_text=Cast("kwargs", TextField())
        )
        words = []
        for word in smart_split(search_term):
            if word.startswith(('"', "'")) and word[0] == word[-1]:
                word = unescape_string_literal(word)
            found = Q()
            for name in _SEARCHED_COLUMNS:
                found |= Q(**{f"{name}__icontains": word})
            for text in {word, json.dumps(word)[1:-1], json.dumps(word, ensure_ascii=False)[1:-1]}:
                found |= Q(args_text__icontains=text) | Q(kwargs_text__icontains=text)
            words.append(found)
        return queryset.filter(*words), False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if request.method == "POST":
            self._refuse_unpermitted_action(request)
        context = {**self.summary(request), **(extra_context or {})}
        return super().changelist_view(request, extra_context=context)

    def summary(self, request: HttpRequest) -> dict[str, Any]:
        """Dead tasks (status "dead") by reason and by task: one aggregate query each."""
        base = DeadTask.objects.using(conf.DATABASE).filter(status=DeadStatus.DEAD)
        changelist = reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_changelist",
            current_app=self.admin_site.name,
        )
        labels = dict(DeadReason.choices)
        by_reason = [
            {
                "label": labels.get(row["reason"], row["reason"]),
                "count": row["n"],
                "url": changelist
                + "?"
                + urlencode({"status__exact": DeadStatus.DEAD, "reason__exact": row["reason"]}),
            }
            for row in base.values("reason").annotate(n=Count("pk")).order_by("-n", "reason")
        ]
        tasks = list(base.values("task_name").annotate(n=Count("pk")).order_by("-n", "task_name"))
        by_task = [
            {
                "label": row["task_name"] or "(no task name)",
                "count": row["n"],
                "url": changelist
                + "?"
                + urlencode(
                    {
                        "status__exact": DeadStatus.DEAD,
                        TaskNameFilter.parameter_name: row["task_name"],
                    }
                )
                if row["task_name"]
                else "",
            }
            for row in tasks[:SUMMARY_TASKS]
        ]
        return {
            "dead_total": sum(r["count"] for r in by_reason),
            "dead_by_reason": by_reason,
            "dead_by_task": by_task,
            "dead_other_tasks": max(len(tasks) - SUMMARY_TASKS, 0),
            "can_requeue": self.has_requeue_permission(request),
            "can_discard": self.has_discard_permission(request),
        }

    # -- the detail page (read-only fields) ----------------------------------------------------------

    @admin.display(description="status")
    def status_line(self, obj: DeadTask) -> str:
        line = obj.get_status_display()
        if obj.status_changed_at is not None:
            line += f" since {timezone.localtime(obj.status_changed_at):%Y-%m-%d %H:%M:%S %Z}"
            if obj.status_changed_by:
                line += f" by {obj.status_changed_by}"
        return line

    @admin.display(description="exception")
    def exception_detail(self, obj: DeadTask) -> SafeString | str:
        if not obj.exc_type:
            return preformatted(obj.exc_message)
        return format_html(
            '<strong class="rt-exc-type">{}</strong>{}', obj.exc_type, preformatted(obj.exc_message)
        )

    @admin.display(description="outbox")
    def outbox_rows(self, obj: DeadTask) -> SafeString | str:
        parts: list[SafeString] = []
        if obj.requeued_outbox_id is not None:
            url = self._outbox_url(obj.requeued_outbox_id)
            row = f"outbox row {obj.requeued_outbox_id}"
            parts.append(
                format_html(
                    'Requeued as <a href="{}">{}</a> (task id {})', url, row, obj.requeued_task_id
                )
                if url
                else format_html("Requeued as {} (task id {})", row, obj.requeued_task_id)
            )
        listing = self._outbox_list_url(obj.task_id)
        if listing:
            parts.append(
                format_html('<a href="{}">Every outbox row of task id {}</a>', listing, obj.task_id)
            )
        if not parts:
            return "-"
        return format_html("<br>".join(["{}"] * len(parts)), *parts)

    @admin.display(description="args")
    def args_json(self, obj: DeadTask) -> SafeString | str:
        return pretty_json(obj.args) if obj.args is not None else "(not decoded)"

    @admin.display(description="kwargs")
    def kwargs_json(self, obj: DeadTask) -> SafeString | str:
        return pretty_json(obj.kwargs) if obj.kwargs is not None else "(not decoded)"

    @admin.display(description="body")
    def raw_body(self, obj: DeadTask) -> SafeString | str:
        return preformatted(Truncator(obj.body).chars(64 * 1024))

    def _outbox_url(self, pk: int) -> str:
        if not self.admin_site.is_registered(OutboxMessage):
            return ""
        return reverse(
            "admin:reliable_tasks_outboxmessage_change", args=[pk], current_app=self.admin_site.name
        )

    def _outbox_list_url(self, task_id: str) -> str:
        if not task_id or not self.admin_site.is_registered(OutboxMessage):
            return ""
        url = reverse(
            "admin:reliable_tasks_outboxmessage_changelist", current_app=self.admin_site.name
        )
        return url + "?" + urlencode({"task_id__exact": task_id})

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: DeadTask | None = None,
    ) -> HttpResponse:
        if obj is not None:
            can_requeue = self.has_requeue_permission(request) and obj.status != DeadStatus.REQUEUED
            can_discard = self.has_discard_permission(request) and obj.status == DeadStatus.DEAD
            context.update(
                attempts=attempts_for_display(obj.attempts),
                can_requeue=can_requeue,
                can_discard=can_discard,
                requeue_form=RequeueForm() if can_requeue else None,
                requeue_url=self._url("requeue", obj.pk),
                requeue_edited_url=self._url("requeue_edited", obj.pk),
                discard_url=self._url("discard", obj.pk),
                acts_offered=can_requeue or can_discard,
            )
        return super().render_change_form(request, context, add, change, form_url, obj)

    # -- acting on one dead task ----------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        own = [
            path("requeue-matching/", wrap(self.requeue_matching_view), name=self._url_name("requeue_matching")),
            path("discard-matching/", wrap(self.discard_matching_view), name=self._url_name("discard_matching")),
            path("<path:object_id>/requeue/", wrap(self.requeue_view), name=self._url_name("requeue")),
            path(
                "<path:object_id>/requeue-edited/",
                wrap(self.requeue_edited_view),
                name=self._url_name("requeue_edited"),
            ),
            path("<path:object_id>/discard/", wrap(self.discard_view), name=self._url_name("discard")),
        ]  # fmt: skip
        # Before Django's own: "<path:object_id>/" would take these paths otherwise.
        return [*own, *super().get_urls()]

    def _url_name(self, view: str) -> str:
        return f"{self.opts.app_label}_{self.opts.model_name}_{view}"

    def _url(self, view: str, *args: Any) -> str:
        return reverse(f"admin:{self._url_name(view)}", args=args, current_app=self.admin_site.name)

    def _change_url(self, obj: DeadTask) -> str:
        return reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
            args=[obj.pk],
            current_app=self.admin_site.name,
        )

    def _get_or_redirect(
        self, request: HttpRequest, object_id: str
    ) -> DeadTask | HttpResponseRedirect:
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            self.message_user(
                request,
                f"There is no dead task with id {object_id!r}; perhaps it was deleted.",
                messages.WARNING,
            )
            return HttpResponseRedirect(self._changelist_url())
        return obj

    def requeue_view(self, request: HttpRequest, object_id: str) -> HttpResponseBase:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        self._require(request, "requeue")
        obj = self._get_or_redirect(request, object_id)
        if isinstance(obj, HttpResponseRedirect):
            return obj
        form = RequeueForm(request.POST)
        if not form.is_valid():
            self.message_user(
                request, "Choose whether to keep or renew the idempotency key.", messages.ERROR
            )
            return HttpResponseRedirect(self._change_url(obj))
        self._requeue_one(
            request, obj, renew_key=form.renew_key, seen=request.POST.get("seen_status")
        )
        return HttpResponseRedirect(self._change_url(obj))

    def requeue_edited_view(self, request: HttpRequest, object_id: str) -> HttpResponseBase:
        self._require(request, "requeue")
        obj = self._get_or_redirect(request, object_id)
        if isinstance(obj, HttpResponseRedirect):
            return obj
        if request.method == "POST":
            form = EditedArgumentsForm(request.POST)
            if form.is_valid():
                requeued = self._requeue_one(
                    request,
                    obj,
                    renew_key=form.renew_key,
                    args=form.cleaned_data["args"],
                    kwargs=form.cleaned_data["kwargs"],
                    seen=request.POST.get("seen_status"),
                )
                if requeued:
                    return HttpResponseRedirect(self._change_url(obj))
        else:
            form = EditedArgumentsForm(
                initial={
                    "args": json.dumps(obj.args or [], indent=2, ensure_ascii=False),
                    "kwargs": json.dumps(obj.kwargs or {}, indent=2, ensure_ascii=False),
                    # New arguments under a key derived from the old ones would be refused as a
                    # reused key; a new key is the safe default here.
                    "key": "renew",
                }
            )
        context = {
            **self.admin_site.each_context(request),
            "title": f"Requeue {obj} with edited arguments",
            "opts": self.opts,
            "original": obj,
            "form": form,
            "status_refuses": obj.status == DeadStatus.REQUEUED,
            "change_url": self._change_url(obj),
            "media": self.media + form.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(
            request, "admin/reliable_tasks/deadtask/requeue_edited.html", context
        )

    def discard_view(self, request: HttpRequest, object_id: str) -> HttpResponseBase:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        self._require(request, "discard")
        obj = self._get_or_redirect(request, object_id)
        if isinstance(obj, HttpResponseRedirect):
            return obj
        user = request.user.get_username()
        with transaction.atomic(using=conf.DATABASE):
            current = self._locked(obj)
            if current.status != DeadStatus.DEAD:
                self.message_user(
                    request,
                    f"{current} is {current.get_status_display()}, not dead; nothing was discarded.",
                    messages.WARNING,
                )
                return HttpResponseRedirect(self._change_url(obj))
            dead.discard(current, user=user)
            self.log_change(request, current, "Discarded (kept for the record; it will not run).")
        self.message_user(
            request, f"Discarded {current}. It stays here for the record.", messages.SUCCESS
        )
        return HttpResponseRedirect(self._change_url(obj))

    def _locked(self, obj: DeadTask) -> DeadTask:
        # Two operators acting at once: the second one sees the first one's status.
        return DeadTask.objects.using(conf.DATABASE).select_for_update().get(pk=obj.pk)

    def _requeue_one(
        self,
        request: HttpRequest,
        obj: DeadTask,
        *,
        renew_key: bool,
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        seen: str | None = None,
    ) -> bool:
        """Requeue through the outbox and log it; report CannotRequeue and refusals as messages.

        ``seen``: the status the operator's page showed. Changed since (another operator
        discarded the dead task), the requeue is refused: it was asked for what the page said.
        """
        user = request.user.get_username()
        with transaction.atomic(using=conf.DATABASE):
            current = self._locked(obj)
            if seen and current.status != seen and current.status != DeadStatus.REQUEUED:
                by = f" by {current.status_changed_by}" if current.status_changed_by else ""
                self.message_user(
                    request,
                    f"{current} was {current.status}{by} after your page showed it "
                    f"{seen}; nothing was changed. Requeue it again if it should still run.",
                    messages.WARNING,
                )
                return False
            if current.status == DeadStatus.REQUEUED:
                self.message_user(
                    request,
                    f"{current} was already requeued (outbox row {current.requeued_outbox_id}); "
                    "nothing was changed. If it fails again, it comes back as a new dead task.",
                    messages.WARNING,
                )
                return False
            try:
                row = dead.requeue(
                    current, renew_key=renew_key, args=args, kwargs=kwargs, user=user
                )
            except dead.CannotRequeue as exc:
                self.message_user(
                    request, f"Cannot requeue: {exc} Nothing was changed.", messages.ERROR
                )
                return False
            how = "a new idempotency key" if renew_key else "its idempotency key kept"
            message = (
                f"Requeued through the outbox as row {row.pk} (task id {row.task_id}), with {how}."
            )
            if args is not None or kwargs is not None:
                message += (
                    f" Edited arguments: args {_clip(args)}, kwargs {_clip(kwargs)}"
                    f" (were args {_clip(current.args)}, kwargs {_clip(current.kwargs)})."
                )
            self.log_change(request, current, message)
        url = self._outbox_url(row.pk)
        self.message_user(
            request,
            format_html('Requeued {} as <a href="{}">outbox row {}</a>.', current, url, row.pk)
            if url
            else f"Requeued {current} as outbox row {row.pk}.",
            messages.SUCCESS,
        )
        return True

    # -- acting on many: the selection, or everything matching the filter ----------------------------

    @admin.action(permissions=["requeue"], description="Requeue selected %(verbose_name_plural)s…")
    def requeue_selected(
        self, request: HttpRequest, queryset: QuerySet[DeadTask]
    ) -> HttpResponseBase | None:
        return self._bulk(request, "requeue", queryset, scope="selection")

    @admin.action(permissions=["discard"], description="Discard selected %(verbose_name_plural)s…")
    def discard_selected(
        self, request: HttpRequest, queryset: QuerySet[DeadTask]
    ) -> HttpResponseBase | None:
        return self._bulk(request, "discard", queryset, scope="selection")

    def requeue_matching_view(self, request: HttpRequest) -> HttpResponseBase:
        return self._matching(request, "requeue")

    def discard_matching_view(self, request: HttpRequest) -> HttpResponseBase:
        return self._matching(request, "discard")

    def _matching(self, request: HttpRequest, operation: Operation) -> HttpResponseBase:
        """Every dead task the changelist shows with these filters and search, on all pages."""
        self._require(request, operation)
        changelist = self._changelist_url()
        request.GET = self._without_page(request)
        try:
            cl: ChangeList = self.get_changelist_instance(request)
        except IncorrectLookupParameters:
            self.message_user(
                request, "These filters are not valid; nothing was changed.", messages.ERROR
            )
            return HttpResponseRedirect(changelist)
        response = self._bulk(request, operation, cl.get_queryset(request), scope="matching")
        if response is None:
            query = request.GET.urlencode()
            return HttpResponseRedirect(changelist + (f"?{query}" if query else ""))
        return response

    @staticmethod
    def _without_page(request: HttpRequest) -> Any:
        """The list's filters and search, without its page: the matching dead tasks are all of
        its pages, and a page number that no longer exists would make the filters invalid."""
        query = request.GET.copy()
        query.pop(PAGE_VAR, None)
        return query

    def _changelist_url(self) -> str:
        return reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_changelist",
            current_app=self.admin_site.name,
        )

    def _refuse_unpermitted_action(self, request: HttpRequest) -> None:
        """Django drops an action the user may not run with "no action selected"; refuse it instead."""
        guarded = {
            "requeue_selected": "requeue",
            "discard_selected": "discard",
            "delete_selected": "delete",
        }
        for name in request.POST.getlist("action"):
            if name in guarded:
                self._require(request, guarded[name])

    def _bulk(
        self,
        request: HttpRequest,
        operation: Operation,
        queryset: QuerySet[DeadTask],
        *,
        scope: Literal["selection", "matching"],
    ) -> HttpResponseBase | None:
        """Show how many dead tasks will be affected; act once the operator confirms.

        The act covers the dead tasks the confirmation page counted, up to the newest of them;
        those that arrived since are left, and the result says how many.
        """
        self._require(request, operation)
        dead_ones = queryset.filter(status=DeadStatus.DEAD).order_by("pk")
        confirmed = request.method == "POST" and request.POST.get("confirm") == "yes"
        form = RequeueForm(request.POST if confirmed else None)
        bound = BulkBoundForm(request.POST if confirmed else None)
        if confirmed and not bound.is_valid():
            self.message_user(
                request,
                "The confirmation did not say which dead tasks it counted; nothing was changed. "
                "Check the count below and confirm again.",
                messages.WARNING,
            )
        elif confirmed and (operation == "discard" or form.is_valid()):
            up_to = bound.cleaned_data["up_to"]
            affected, _ = _affected(operation, dead_ones.filter(pk__lte=up_to))
            if affected:
                renew_key = operation == "requeue" and form.renew_key
                self._run_bulk(request, operation, affected, renew_key=renew_key)
                self._report_arrivals(request, dead_ones.filter(pk__gt=up_to).count())
                return None
        affected, unsendable = _affected(operation, dead_ones)
        total = queryset.count()
        context = {
            **self.admin_site.each_context(request),
            "title": f"{operation.capitalize()} dead tasks",
            "opts": self.opts,
            "operation": operation,
            "verb_past": "requeued" if operation == "requeue" else "discarded",
            "scope": scope,
            "total": total,
            "affected": len(affected),
            "not_dead": total - dead_ones.count(),
            "unsendable": unsendable,
            "batches": -(-len(affected) // BATCH_SIZE),
            "batch_size": BATCH_SIZE,
            "sample": DeadTask.objects.using(conf.DATABASE).filter(pk__in=affected[:SAMPLE_SIZE]),
            "form": form if operation == "requeue" else None,
            "up_to": dead_ones.aggregate(newest=Max("pk"))["newest"],
            "filters": [(k, v) for k, v in request.GET.items() if k not in ("o", "p")],
            "action_name": f"{operation}_selected",
            "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"),
            "back_url": self._changelist_url()
            + (f"?{request.GET.urlencode()}" if request.GET else ""),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(
            request, "admin/reliable_tasks/deadtask/bulk_confirmation.html", context
        )

    def _report_arrivals(self, request: HttpRequest, arrived: int) -> None:
        if not arrived:
            return
        one = arrived == 1
        self.message_user(
            request,
            f"{arrived:,} more dead task{'' if one else 's'} matching arrived after the "
            f"confirmation page was shown; {'it was' if one else 'they were'} left as "
            f"{'it is' if one else 'they are'}, for a next look.",
            messages.WARNING,
        )

    def _run_bulk(
        self, request: HttpRequest, operation: Operation, ids: Sequence[int], *, renew_key: bool
    ) -> None:
        user = request.user.get_username()
        user_pk = request.user.pk
        if user_pk is None:  # admin views let no anonymous user in; this keeps it so
            raise PermissionDenied
        if operation == "requeue":
            status = DeadStatus.REQUEUED
            log = f"Requeued through the outbox (bulk), with {'a new idempotency key' if renew_key else 'its idempotency key kept'}."
        else:
            status = DeadStatus.DISCARDED
            log = "Discarded (bulk; kept for the record, it will not run)."
        done = 0
        try:
            for start in range(0, len(ids), BATCH_SIZE):
                batch = DeadTask.objects.using(conf.DATABASE).filter(
                    pk__in=ids[start : start + BATCH_SIZE]
                )
                with transaction.atomic(using=conf.DATABASE):
                    if operation == "requeue":
                        count = dead.requeue_many(
                            batch, renew_key=renew_key, user=user, batch_size=BATCH_SIZE
                        )
                    else:
                        count = dead.discard_many(batch, user=user, batch_size=BATCH_SIZE)
                    LogEntry.objects.log_actions(
                        user_id=user_pk,
                        queryset=batch.filter(status=status, status_changed_by=user),
                        action_flag=CHANGE,
                        change_message=log,
                    )
                done += count
        except dead.CannotRequeue as exc:
            self.message_user(
                request,
                f"Stopped after requeueing {done:,} dead tasks: {exc} The batch in progress was "
                "rolled back; nothing else was changed.",
                messages.ERROR,
            )
            return
        verb = "Requeued" if operation == "requeue" else "Discarded"
        where = " through the outbox" if operation == "requeue" else " (kept for the record)"
        self.message_user(
            request,
            f"{verb} {done:,} dead task{'s' if done != 1 else ''}{where}.",
            messages.SUCCESS,
        )


def _affected(operation: Operation, dead_ones: QuerySet[DeadTask]) -> tuple[list[int], int]:
    """The ids ``operation`` would act on, and a count of those it would refuse."""
    if operation == "requeue":
        return _requeueable(dead_ones)
    return list(dead_ones.values_list("pk", flat=True)), 0


def _requeueable(dead_ones: QuerySet[DeadTask]) -> tuple[list[int], int]:
    """Split dead tasks into those ``dead.requeue`` can send and a count of those it refuses."""
    sendable: list[int] = []
    refused = 0
    for pk, encoding, task in dead_ones.values_list("pk", "content_encoding", "headers__task"):
        if encoding == "base64" or not task:
            refused += 1
        else:
            sendable.append(pk)
    return sendable, refused


def _clip(value: Any) -> str:
    return Truncator(json.dumps(value, ensure_ascii=False, default=str)).chars(300)


# -- the outbox and the ledger, read-only -----------------------------------------------------------


@admin.register(OutboxMessage)
class OutboxMessageAdmin(_MessageFields, ReadOnlyAdmin[OutboxMessage]):
    """The outbox: what waits for the relay, and the recent dispatches kept for audit."""

    list_display = (
        "task_name",
        "task_id",
        "status",
        "due_at",
        "created_at",
        "dispatched_at",
        "publish_attempts",
        "short_error",
    )
    list_filter = ("status", TaskNameFilter)
    search_fields = ("task_id", "task_name")
    show_full_result_count = False  # dispatched rows are many; an unfiltered count costs a scan
    fields = (
        ("task_name", "task_id"),
        ("status", "publish_attempts"),
        ("created_at", "due_at", "dispatched_at"),
        "last_error_text",
        "dead_tasks",
        "arguments",
        ("queue", "exchange", "routing_key"),
        "headers_json",
        "properties_json",
        ("content_type", "content_encoding"),
    )
    readonly_fields = (
        "last_error_text",
        "dead_tasks",
        "arguments",
        "headers_json",
        "properties_json",
    )
    change_list_template = "admin/reliable_tasks/outboxmessage/change_list.html"

    @admin.display(description="last error")
    def short_error(self, obj: OutboxMessage) -> str:
        return Truncator(obj.last_error).chars(80) or "-"

    @admin.display(description="last error")
    def last_error_text(self, obj: OutboxMessage) -> SafeString | str:
        return preformatted(obj.last_error)

    @admin.display(description="arguments")
    def arguments(self, obj: OutboxMessage) -> SafeString | str:
        try:
            args, kwargs, _embed = dead.decode_body(
                obj.body, obj.content_type, obj.content_encoding
            )
        except Exception as exc:  # noqa: BLE001 - any decoding failure is shown, not raised
            return f"(cannot decode the body: {exc})"
        return pretty_json({"args": args, "kwargs": kwargs})

    @admin.display(description="requeue of")
    def dead_tasks(self, obj: OutboxMessage) -> SafeString | str:
        links = [
            format_html(
                '<a href="{}">{}</a>',
                reverse(
                    "admin:reliable_tasks_deadtask_change",
                    args=[d.pk],
                    current_app=self.admin_site.name,
                ),
                d,
            )
            for d in DeadTask.objects.using(conf.DATABASE).filter(requeued_outbox_id=obj.pk)
        ]
        return format_html("<br>".join(["{}"] * len(links)), *links) if links else "-"

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        return super().changelist_view(request, {**backlog(), **(extra_context or {})})


def backlog() -> dict[str, Any]:
    """Pending rows, those due now and the age of the oldest due one (one query); relays."""
    now = timezone.now()
    due = Q(due_at__lte=now)
    figures = (
        OutboxMessage.objects.using(conf.DATABASE)
        .filter(status=OutboxStatus.PENDING)
        .aggregate(
            pending=Count("pk"), due=Count("pk", filter=due), oldest_due=Min("due_at", filter=due)
        )
    )
    relays = list(
        RelayHeartbeat.objects.using(conf.DATABASE)
        .filter(stopped_at__isnull=True)
        .order_by("-last_seen_at")[:5]
    )
    oldest = figures["oldest_due"]
    return {
        "pending": figures["pending"],
        "due_now": figures["due"],
        "oldest_due_age": short_age(now - oldest) if oldest is not None else "",
        "relays": [(r.name, short_age(now - r.last_seen_at), r.dispatched_total) for r in relays],
    }


@admin.register(IdempotencyKey)
class IdempotencyKeyAdmin(ReadOnlyAdmin[IdempotencyKey]):
    """The execution ledger: which keys are running or done."""

    list_display = (
        "task_name",
        "key",
        "state",
        "attempts",
        "lease_expires_at",
        "completed_at",
        "task_id",
    )
    list_filter = ("state", TaskNameFilter)
    search_fields = ("key", "task_id")
    show_full_result_count = False
    fields = (
        ("task_name", "key"),
        ("state", "attempts"),
        ("task_id", "worker"),
        ("created_at", "updated_at"),
        ("lease_expires_at", "completed_at"),
        "fingerprint",
        "result_json",
    )
    readonly_fields = ("result_json",)

    @admin.display(description="result")
    def result_json(self, obj: IdempotencyKey) -> SafeString:
        return pretty_json(obj.result)


@admin.register(TaskAttempt)
class TaskAttemptAdmin(ReadOnlyAdmin[TaskAttempt]):
    """Failed and lost attempts, as the retries recorded them."""

    list_display = ("task_name", "task_id", "number", "outcome", "exc_type", "worker", "ended_at")
    list_filter = ("outcome", TaskNameFilter)
    search_fields = ("task_id", "idempotency_key", "exc_type", "message")
    show_full_result_count = False
    fields = (
        ("task_name", "task_id"),
        ("idempotency_key", "number", "outcome"),
        ("worker", "started_at", "ended_at"),
        "exc_type",
        "message_text",
        "traceback_text",
    )
    readonly_fields = ("message_text", "traceback_text")

    @admin.display(description="message")
    def message_text(self, obj: TaskAttempt) -> SafeString | str:
        return preformatted(obj.message)

    @admin.display(description="traceback")
    def traceback_text(self, obj: TaskAttempt) -> SafeString | str:
        return preformatted(obj.traceback)


@admin.register(RelayHeartbeat)
class RelayHeartbeatAdmin(ReadOnlyAdmin[RelayHeartbeat]):
    """Relays and their last sign of life."""

    list_display = ("name", "started_at", "last_seen_at", "dispatched_total", "stopped_at")
    ordering = ("-last_seen_at",)


__all__ = [
    "DeadTaskAdmin",
    "IdempotencyKeyAdmin",
    "OutboxMessageAdmin",
    "RelayHeartbeatAdmin",
    "TaskAttemptAdmin",
]
