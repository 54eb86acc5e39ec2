"""Sentry: one event per dead task with a stable fingerprint, breadcrumbs for retries, and the
producer's trace continued by the task, through the outbox.

The real sentry-sdk runs here, with the integrations a user would turn on; only Sentry's
servers are replaced, by a transport that keeps what it would have sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from django.db import transaction
from sentry_sdk.consts import DEFAULT_OPTIONS
from sentry_sdk.consts import VERSION as SENTRY_VERSION
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.django import DjangoIntegration
from sentry_sdk.transport import Transport

from reliable_tasks import dead, signals, testing
from reliable_tasks.integrations import sentry
from reliable_tasks.models import DeadTask, OutboxMessage
from reliable_tasks.relay import Relay
from tests.support import ROOT, Broker, ProcessFactory, effects, wait_for
from tests.testapp.tasks import charge, pay, record

pytestmark = pytest.mark.django_db(transaction=True)

DSN = "https://key@sentry.invalid/1"
PAY = pay.name
DECLINED = "tests.testapp.tasks.CardDeclined"
TIMEOUT = "tests.testapp.tasks.GatewayTimeout"


class CapturingTransport(Transport):
    """Stands in for Sentry's servers: keeps every envelope the SDK would send."""

    def __init__(self) -> None:
        super().__init__()
        self.envelopes: list[Envelope] = []
        self.breadcrumbs: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def payloads(self, kind: str) -> list[dict[str, Any]]:
        return [
            item.payload.json
            for envelope in self.envelopes
            for item in envelope.items
            if item.type == kind and item.payload.json is not None
        ]

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.payloads("event")

    @property
    def transactions(self) -> list[dict[str, Any]]:
        return self.payloads("transaction")

    def ours(self) -> list[dict[str, Any]]:
        """Breadcrumbs of reliable_tasks, as the SDK recorded them."""
        return [c for c in self.breadcrumbs if c.get("category") == sentry.CATEGORY]


InitSentry = Callable[..., CapturingTransport]


@pytest.fixture
def init_sentry() -> Iterator[InitSentry]:
    """``sentry_sdk.init`` as a user's project calls it; the previous client is back after."""
    global_scope = sentry_sdk.get_global_scope()
    previous = global_scope.client
    clients: list[Any] = []

    def init(**options: Any) -> CapturingTransport:
        transport = CapturingTransport()

        def keep(crumb: dict[str, Any], hint: Any) -> dict[str, Any]:
            transport.breadcrumbs.append(crumb)
            return crumb

        sentry_sdk.init(
            dsn=DSN,
            transport=transport,
            integrations=[CeleryIntegration(), DjangoIntegration()],
            before_breadcrumb=keep,
            **options,
        )
        clients.append(sentry_sdk.get_client())
        return transport

    # Tags, breadcrumbs and trace state of the test stay in a scope of its own.
    with sentry_sdk.isolation_scope():
        yield init
    for client in clients:
        client.close()
    global_scope.set_client(previous)


@pytest.fixture(autouse=True)
def _signal_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.testapp.tasks.SIGNAL_DIR", tmp_path)


# -- dead tasks ----------------------------------------------------------------------------------


def test_a_dead_task_sends_one_error_event_with_its_tags_fingerprint_and_traceback(
    init_sentry: InitSentry,
) -> None:
    sent = init_sentry()
    assert pay.apply((3,), {"outcome": "declined"}, task_id="pay-3").failed()
    task = DeadTask.objects.get()
    [event] = sent.events
    assert event["level"] == "error"
    assert event["fingerprint"] == [PAY, DECLINED]
    assert event["tags"] == event["tags"] | {
        "reliable_tasks.task": PAY,
        "reliable_tasks.reason": "give_up",
        "reliable_tasks.idempotency_key": "pay-3",
        "reliable_tasks.attempts": "1",
        "reliable_tasks.dead_task_id": str(task.pk),
        "reliable_tasks.task_id": "pay-3",
    }
    [exception] = event["exception"]["values"]
    assert (exception["type"], exception["value"]) == ("CardDeclined", "card declined for order 3")
    assert exception["mechanism"]["handled"] is False
    assert any(f["function"] == "pay" for f in exception["stacktrace"]["frames"])
    context = event["contexts"]["reliable_tasks"]
    assert context["dead_task_id"] == task.pk
    assert context["reason"] == "give-up exception"
    assert context["exc_type"] == DECLINED
    assert "raise CardDeclined" in context["last_traceback"]
    assert [a["number"] for a in context["attempts"]] == [1]
    assert "traceback" not in context["attempts"][0]


def test_dead_tasks_of_one_failure_share_a_fingerprint_and_other_failures_do_not(
    init_sentry: InitSentry,
) -> None:
    sent = init_sentry()
    pay.apply((31,), {"outcome": "declined"})
    pay.apply((32,), {"outcome": "declined"})
    pay.apply((33,), {"outcome": "bug"})
    first, second, other = (event["fingerprint"] for event in sent.events)
    assert first == second == [PAY, DECLINED]
    assert other == [PAY, "builtins.KeyError"]


# With tracing on, Django's integration runs signal receivers in an orphan span, whose own
# trace would win over the message's if the event did not name the trace explicitly.
@pytest.mark.parametrize("traces_sample_rate", [None, 1.0])
def test_a_dead_task_without_an_exception_is_fingerprinted_by_its_reason_and_joins_the_producers_trace(
    init_sentry: InitSentry, traces_sample_rate: float | None
) -> None:
    sent = init_sentry(traces_sample_rate=traces_sample_rate)
    trace_id = "771a43a4192642f0b136d5159a501700"
    headers = {
        "task": "shop.tasks.gone",
        "id": "t-1",
        "sentry-trace": f"{trace_id}-b7ad6b7169203331-1",
    }
    message = dead.RawMessage(
        headers=headers, properties={}, body='[[], {}, {}]', content_type="application/json",
        content_encoding="utf-8",
    )  # fmt: skip
    with transaction.atomic():
        dead.capture_raw(message, reason="unregistered", error="no task named shop.tasks.gone")
        assert sent.events == []  # sent once the dead task is committed
    [event] = sent.events
    assert event["fingerprint"] == ["shop.tasks.gone", "unregistered"]
    assert event["level"] == "error"
    assert event["message"] == "dead task shop.tasks.gone: no such task registered"
    assert "exception" not in event
    assert event["tags"]["reliable_tasks.reason"] == "unregistered"
    assert event["contexts"]["trace"]["trace_id"] == trace_id


def test_retries_leave_breadcrumbs_and_send_no_event(init_sentry: InitSentry) -> None:
    sent = init_sentry()
    assert pay.apply((5,), {"outcome": "timeout"}).state == "RETRY"
    assert sent.events == []
    [crumb] = sent.ours()
    assert crumb["level"] == "warning"
    assert crumb["message"].startswith(f"{PAY}: attempt 1 failed (GatewayTimeout), retry in ")
    assert crumb["data"]["attempt"] == 1
    assert crumb["data"]["exception"] == TIMEOUT


def test_a_task_that_exhausts_its_retries_sends_one_event_after_its_breadcrumbs(
    init_sentry: InitSentry,
) -> None:
    sent = init_sentry()
    pay.delay(7, outcome="timeout")
    with pytest.raises(Exception, match="gateway timed out for order 7"):
        testing.run_enqueued()
    assert [c["data"]["attempt"] for c in sent.ours()] == [1, 2]
    [event] = sent.events
    assert event["fingerprint"] == [PAY, TIMEOUT]
    assert event["tags"]["reliable_tasks.reason"] == "exhausted"
    assert event["tags"]["reliable_tasks.attempts"] == "3"
    assert [a["number"] for a in event["contexts"]["reliable_tasks"]["attempts"]] == [1, 2, 3]


@pytest.mark.filterwarnings("ignore:.*send_default_pii.*deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    ("options", "allowed"),
    [
        ({}, False),
        ({"send_default_pii": False}, False),
        ({"send_default_pii": True}, True),
        # sentry-sdk's newer option, which wins over send_default_pii, as in its Celery integration.
        ({"data_collection": {"queues": True}}, True),
        ({"data_collection": {"queues": False}, "send_default_pii": True}, False),
    ],
)
def test_task_arguments_are_sent_only_when_the_project_allows_pii(
    init_sentry: InitSentry, options: dict[str, Any], allowed: bool
) -> None:
    if "data_collection" in options and "data_collection" not in DEFAULT_OPTIONS:
        pytest.skip(f"sentry-sdk {SENTRY_VERSION} has no data_collection option")
    sent = init_sentry(**options)
    pay.apply((8,), {"outcome": "declined"})
    [event] = sent.events
    context = event["contexts"]["reliable_tasks"]
    frames = [f for e in event["exception"]["values"] for f in e["stacktrace"]["frames"]]
    pay_frame = next(f for f in frames if f["function"] == "pay")
    if allowed:
        assert (context["args"], context["kwargs"]) == ([8], {"outcome": "declined"})
        assert pay_frame["vars"]["order_id"] == "8"
    else:
        assert "args" not in context
        assert "kwargs" not in context
        # The task's frames, whose local variables are its arguments, go without them.
        assert not any(f.get("vars") for f in frames)


def test_duplicates_and_requeues_leave_breadcrumbs(init_sentry: InitSentry) -> None:
    sent = init_sentry()
    charge.apply((9,), {"amount": 10})
    charge.apply((9,), {"amount": 10})
    pay.apply((10,), {"outcome": "declined"})
    dead.requeue(DeadTask.objects.get(), user="ops")
    duplicate, requeued = sent.ours()
    assert duplicate["data"]["idempotency_key"] == "charge:9"
    assert "key done already" in duplicate["message"]
    assert requeued["data"]["user"] == "ops"
    assert requeued["message"].startswith("dead task ")


def test_a_report_that_fails_does_not_change_what_happens_to_the_task(
    init_sentry: InitSentry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    init_sentry()

    def broken(*args: Any) -> None:
        raise RuntimeError("Sentry is having a bad day")

    monkeypatch.setattr(sentry, "report_dead_task", broken)
    outcome = pay.apply((11,), {"outcome": "declined"})
    assert type(outcome.result).__name__ == "CardDeclined"
    assert DeadTask.objects.get().reason == "give_up"
    assert "could not report dead task" in caplog.text


def test_without_a_sentry_client_the_handlers_return_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not sentry_sdk.get_client().is_active()

    def never(*args: Any) -> None:
        raise AssertionError("reported with no Sentry client")

    monkeypatch.setattr(sentry, "report_dead_task", never)
    monkeypatch.setattr(sentry, "_breadcrumb", never)
    assert pay.apply((12,), {"outcome": "timeout"}).state == "RETRY"
    assert pay.apply((13,), {"outcome": "declined"}).failed()
    assert DeadTask.objects.count() == 1


def test_connect_is_idempotent() -> None:
    sentry.connect()
    sentry.connect()
    uids = [key[0] for key, *_ in signals.task_dead.receivers]
    assert uids.count(f"{sentry._UID}.dead") == 1


def test_without_sentry_sdk_installed_nothing_is_connected() -> None:
    code = (
        "import sys; sys.modules['sentry_sdk'] = None\n"
        "import django; django.setup()\n"
        "from reliable_tasks import signals\n"
        "from reliable_tasks.integrations import sentry\n"
        "assert not sentry.HAVE_SENTRY\n"
        "print(sum(str(k[0]).startswith(sentry._UID) for s in (signals.task_dead, signals.task_retried)"
        " for k, *_ in s.receivers))\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "0"


# -- trace propagation ---------------------------------------------------------------------------


def test_the_outbox_row_carries_the_producers_trace_and_the_task_continues_it(
    init_sentry: InitSentry,
) -> None:
    sent = init_sentry(traces_sample_rate=1.0)
    with (
        sentry_sdk.start_transaction(op="http.server", name="checkout") as producer,
        transaction.atomic(),
    ):
        result = record.delay("traced")
    row = OutboxMessage.objects.get(task_id=result.id)
    assert row.headers["sentry-trace"].startswith(f"{producer.trace_id}-")
    assert f"sentry-trace_id={producer.trace_id}" in row.headers["baggage"]

    assert testing.run_enqueued() == ["traced"]
    checkout, task = sent.transactions
    assert checkout["transaction"] == "checkout"
    # The Celery integration's spans around Task.apply_async and Celery.send_task.
    submits = {s["span_id"] for s in checkout["spans"] if s["op"] == "queue.submit.celery"}
    assert task["transaction"] == record.name
    assert task["contexts"]["trace"]["op"] == "queue.task.celery"
    assert task["contexts"]["trace"]["trace_id"] == producer.trace_id
    assert task["contexts"]["trace"]["parent_span_id"] in submits


def test_retries_and_the_dead_task_event_stay_in_the_producers_trace(
    init_sentry: InitSentry,
) -> None:
    sent = init_sentry(traces_sample_rate=1.0)
    with sentry_sdk.start_transaction(name="checkout") as producer:
        pay.delay(14, outcome="timeout")
    with pytest.raises(Exception, match="timed out"):
        testing.run_enqueued()
    attempts = [t for t in sent.transactions if t["transaction"] == PAY]
    assert len(attempts) == 3
    assert {t["contexts"]["trace"]["trace_id"] for t in attempts} == {producer.trace_id}
    [event] = sent.events
    assert event["contexts"]["trace"]["trace_id"] == producer.trace_id


class WorkerSentry:
    """What a worker process sent to Sentry: it writes each envelope item to a file (see
    tests/celery_app.py, RT_TEST_SENTRY_ENVELOPES)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def env(self) -> dict[str, str]:
        return {"RT_TEST_SENTRY_ENVELOPES": str(self.path)}

    def payloads(self, kind: str) -> list[dict[str, Any]]:
        items = [json.loads(line) for line in self.path.read_text().splitlines()]
        return [item["payload"] for item in items if item["type"] == kind]

    def wait_for_transaction(self, name: str) -> dict[str, Any]:
        """The worker's transaction of task ``name``, sent once the task has finished."""

        def found() -> dict[str, Any] | None:
            return next((t for t in self.payloads("transaction") if t["transaction"] == name), None)

        return dict(wait_for(found, timeout=60, what=f"the worker's transaction of {name}"))


@pytest.fixture
def worker_sentry(tmp_path: Path) -> WorkerSentry:
    return WorkerSentry(tmp_path / "worker-envelopes.jsonl")


@pytest.mark.slow
def test_a_worker_process_continues_the_producers_trace_from_the_published_message(
    init_sentry: InitSentry, relay: Relay, processes: ProcessFactory, worker_sentry: WorkerSentry
) -> None:
    """Producer, relay and task in one trace, each the parent of the next."""
    processes.worker(env=worker_sentry.env())
    sent = init_sentry(traces_sample_rate=1.0)
    with sentry_sdk.start_transaction(name="checkout") as producer, transaction.atomic():
        result = record.delay("traced-by-a-worker")
    relay.drain()
    task = worker_sentry.wait_for_transaction(record.name)
    assert effects("traced-by-a-worker") == ["traced-by-a-worker"]
    checkout, published = sent.transactions
    submits = {s["span_id"] for s in checkout["spans"] if s["op"] == "queue.submit.celery"}
    relay_trace = published["contexts"]["trace"]
    assert (relay_trace["op"], relay_trace["status"]) == ("queue.publish", "ok")
    assert published["transaction"] == record.name
    assert relay_trace["trace_id"] == producer.trace_id
    assert relay_trace["parent_span_id"] in submits
    assert relay_trace["data"]["messaging.message.id"] == result.id
    assert task["contexts"]["trace"]["op"] == "queue.task.celery"
    assert task["contexts"]["trace"]["trace_id"] == producer.trace_id
    assert task["contexts"]["trace"]["parent_span_id"] == relay_trace["span_id"]


def test_the_relay_span_of_a_row_the_broker_refused_says_why(
    init_sentry: InitSentry, broker: Broker, relay: Relay
) -> None:
    sent = init_sentry(traces_sample_rate=1.0)
    with sentry_sdk.start_transaction(name="checkout") as producer:
        result = record.apply_async(
            ("refused",), exchange="rt-tests-no-such-exchange", routing_key="x"
        )
    assert relay.run_once() == 0
    [published] = [t for t in sent.transactions if t["contexts"]["trace"]["op"] == "queue.publish"]
    trace = published["contexts"]["trace"]
    assert (trace["status"], trace["trace_id"]) == ("internal_error", producer.trace_id)
    assert trace["data"]["messaging.message.id"] == result.id
    assert "NOT_FOUND" in trace["data"]["reliable_tasks.not_published"]
    assert OutboxMessage.objects.get().status == "pending"


@pytest.mark.parametrize(
    "relay_options",
    [
        {},  # Sentry without tracing
        # Tracing through OpenTelemetry: sentry-sdk gives the relay no transaction to hand on.
        {"traces_sample_rate": 1.0, "instrumenter": "otel"},
    ],
)
def test_a_relay_without_tracing_publishes_the_producers_headers_as_they_are(
    init_sentry: InitSentry, broker: Broker, relay: Relay, relay_options: dict[str, Any]
) -> None:
    init_sentry(traces_sample_rate=1.0)
    with sentry_sdk.start_transaction(name="checkout"):
        result = record.delay("traced")
    stored = OutboxMessage.objects.get(task_id=result.id).headers["sentry-trace"]
    sent = init_sentry(**relay_options)  # the relay's process
    relay.drain()
    [message] = broker.get_all(expect=1)
    assert message.headers["sentry-trace"] == stored
    assert message.headers["headers"]["sentry-trace"] == stored
    assert sent.transactions == []


@pytest.mark.slow
def test_a_task_that_dies_on_a_worker_sends_one_event_in_the_producers_trace(
    init_sentry: InitSentry, relay: Relay, processes: ProcessFactory, worker_sentry: WorkerSentry
) -> None:
    processes.worker(env=worker_sentry.env())
    init_sentry(traces_sample_rate=1.0)
    with sentry_sdk.start_transaction(name="checkout") as producer, transaction.atomic():
        pay.delay(15, outcome="declined")
    relay.drain()
    worker_sentry.wait_for_transaction(PAY)
    # The Celery integration's own event for the same exception is dropped as a duplicate.
    # (Other events may come from the worker: a broker restarted by another test, say.)
    [event] = [e for e in worker_sentry.payloads("event") if "order 15" in json.dumps(e)]
    assert event["fingerprint"] == [PAY, DECLINED]
    assert event["tags"]["reliable_tasks.dead_task_id"] == str(DeadTask.objects.get().pk)
    assert event["contexts"]["trace"]["trace_id"] == producer.trace_id
