"""health/ and metrics/ (include ``reliable_tasks.urls`` at a prefix of your choice)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from . import health as health_check
from .metrics import Snapshot, snapshot


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """200 when the pipeline delivers, 503 with the reasons when not. Shows no task arguments."""
    result = health_check.check()
    body: dict[str, Any] = {"status": "ok" if result.ok else "failing", "reasons": result.reasons}
    if result.snapshot is not None:
        snap = result.snapshot
        body["outbox"] = {
            "pending": snap.outbox_pending,
            "due": snap.outbox_due,
            "oldest_due_age_seconds": snap.oldest_due_age_seconds,
            "failing": snap.outbox_failing,
            "oldest_failing_age_seconds": snap.oldest_failing_age_seconds,
            "dispatched_last_minute": snap.dispatched_last_minute,
        }
        body["relays"] = [
            {
                "name": r.name,
                "seconds_since_seen": round(r.seconds_since_seen, 1),
                "stopped": r.stopped,
            }
            for r in snap.relays
        ]
        body["dead_tasks"] = snap.dead_total
    return JsonResponse(body, status=200 if result.ok else 503)


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """The snapshot in Prometheus' text format (needs prometheus-client)."""
    try:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST
    except ImportError:
        return HttpResponse(
            "metrics/ needs prometheus-client: pip install 'reliable-tasks[metrics]'\n",
            status=501,
            content_type="text/plain",
        )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot()))
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


class _Collector:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        s = self.snap
        yield GaugeMetricFamily(
            "reliable_tasks_outbox_pending",
            "Outbox rows not yet dispatched.",
            value=s.outbox_pending,
        )
        yield GaugeMetricFamily(
            "reliable_tasks_outbox_due", "Pending outbox rows due now.", value=s.outbox_due
        )
        yield GaugeMetricFamily(
            "reliable_tasks_outbox_oldest_due_age_seconds",
            "How long the oldest due outbox row has waited.",
            value=s.oldest_due_age_seconds or 0.0,
        )
        yield GaugeMetricFamily(
            "reliable_tasks_outbox_failing",
            "Pending outbox rows whose last publish failed.",
            value=s.outbox_failing,
        )
        yield GaugeMetricFamily(
            "reliable_tasks_outbox_oldest_failing_age_seconds",
            "How long the broker has refused the pending row it has refused longest.",
            value=s.oldest_failing_age_seconds or 0.0,
        )
        yield GaugeMetricFamily(
            "reliable_tasks_dispatched_last_minute",
            "Outbox rows dispatched in the last minute.",
            value=s.dispatched_last_minute,
        )
        yield GaugeMetricFamily(
            "reliable_tasks_retries_scheduled",
            "Pending outbox rows that are retries.",
            value=s.retries_scheduled,
        )
        seen = GaugeMetricFamily(
            "reliable_tasks_relay_seconds_since_heartbeat",
            "Seconds since each relay's last heartbeat.",
            labels=["relay"],
        )
        for relay in s.relays:
            if not relay.stopped:
                seen.add_metric([relay.name], relay.seconds_since_seen)
        yield seen
        by_reason = GaugeMetricFamily(
            "reliable_tasks_dead_tasks_by_reason",
            "Dead tasks nobody acted on yet, by reason.",
            labels=["reason"],
        )
        for reason, count in s.dead_by_reason.items():
            by_reason.add_metric([reason], count)
        yield by_reason
        by_task = GaugeMetricFamily(
            "reliable_tasks_dead_tasks_by_task",
            "Dead tasks nobody acted on yet, by task.",
            labels=["task"],
        )
        for task, count in s.dead_by_task.items():
            by_task.add_metric([task], count)
        yield by_task
        yield GaugeMetricFamily(
            "reliable_tasks_ledger_keys", "Idempotency keys in the ledger.", value=s.ledger_keys
        )
        for name, value in s.counters.items():
            yield CounterMetricFamily(
                f"reliable_tasks_{name}", f"{name.replace('_', ' ')} seen by workers.", value=value
            )
        for name, histogram in s.histograms.items():
            yield HistogramMetricFamily(
                f"reliable_tasks_task_{name}_seconds",
                "From enqueue to task start." if name == "latency" else "How long tasks ran.",
                buckets=[(label, float(count)) for label, count in histogram.buckets.items()],
                sum_value=histogram.sum,
            )
