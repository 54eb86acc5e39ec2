"""Scaling figures for the scaling guide: several relays, and a quorum queue.

Relays: 20,000 committed rows drained by one relay process, then by two, in interleaved rounds
(relay processes of ``manage.py reliable_tasks relay``, started and idle before the rows are
committed in one transaction; timed from the commit until no row is pending). On PostgreSQL the
relays claim with ``SKIP LOCKED`` and share the rows; on a machine with few cores they share its
CPU too, which the figure shows.

Quorum queue: the same drain by an in-process relay into a classic durable queue and into a
quorum queue (``x-queue-type: quorum``), interleaved. A quorum queue confirms a message once a
majority of its replicas wrote it; on one node that is one write to its log.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

ROWS = 20_000
ROUNDS = 2


def bench_scaling(
    results: Any,
    broker: Any,
    queue: str,
    processes: Any,
    helpers: Any,
) -> None:
    """``helpers``: the benchmark's run module (outbox copies, counts, waits)."""
    relays: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(ROUNDS):
        for count in relays:
            drained = _drain_with_relay_processes(count, broker, queue, processes, helpers)
            relays[count].append(drained)
    results.figures["relays_1_msgs_per_s"] = statistics.fmean(relays[1])
    results.figures["relays_2_msgs_per_s"] = statistics.fmean(relays[2])
    results.figures["relays_2_vs_1"] = statistics.fmean(relays[2]) / statistics.fmean(relays[1])

    quorum_queue = queue + ".quorum"
    kinds: dict[str, list[float]] = {"classic": [], "quorum": []}
    try:
        for _ in range(ROUNDS):
            kinds["classic"].append(_drain_in_process(queue, broker, helpers))
            kinds["quorum"].append(_drain_in_process(quorum_queue, broker, helpers, quorum=True))
    finally:
        broker.delete(quorum_queue)
    results.figures["classic_queue_msgs_per_s"] = statistics.fmean(kinds["classic"])
    results.figures["quorum_queue_msgs_per_s"] = statistics.fmean(kinds["quorum"])
    results.figures["quorum_vs_classic"] = statistics.fmean(kinds["quorum"]) / statistics.fmean(
        kinds["classic"]
    )


def _templates(helpers: Any) -> list[int]:
    """Real outbox rows to copy, marked dispatched so that no relay takes them."""
    from reliable_tasks.models import OutboxMessage

    helpers.clear_outbox()
    templates = helpers.enqueue_templates()
    OutboxMessage.objects.filter(pk__in=templates).update(status="dispatched")
    return list(templates)


def _drain_with_relay_processes(
    count: int, broker: Any, queue: str, processes: Any, helpers: Any
) -> float:
    from reliable_tasks.models import RelayHeartbeat

    processes.stop_all()
    RelayHeartbeat.objects.all().delete()
    templates = _templates(helpers)
    broker.purge(queue)
    names = [f"bench-scale-{n}" for n in range(count)]
    started = [
        processes.start("-m", "django", "reliable_tasks", "relay", "--name", name) for name in names
    ]
    helpers.wait_for(
        lambda: (
            RelayHeartbeat.objects.filter(name__in=names).count() == count
            or any(p.poll() is not None for p in started)
        ),
        30,
        f"{count} relays' first heartbeats",
    )
    for proc in started:
        helpers.check(proc.poll() is None, f"the relay runs:\n{processes.log_of(proc)}")
    helpers.copy_outbox_rows(templates, ROWS)  # one transaction: every relay is woken at commit
    committed = time.perf_counter()
    helpers.wait_until_relayed(timeout=120)
    elapsed = time.perf_counter() - committed
    depth = broker.wait_depth(queue, ROWS)
    helpers.check(depth == ROWS, f"the queue holds {depth} messages, not {ROWS}")
    for proc in started:
        helpers.check_relay_log(processes.log_of(proc))
    processes.stop_all()
    broker.purge(queue)
    helpers.clear_outbox()
    return ROWS / elapsed


def _drain_in_process(name: str, broker: Any, helpers: Any, *, quorum: bool = False) -> float:
    from django.db import connection
    from kombu import Queue

    from benchmarks.celery_app import app
    from reliable_tasks.models import OutboxMessage
    from reliable_tasks.relay import Relay

    arguments = {"x-queue-type": "quorum"} if quorum else None
    # Declared as the project's Celery configuration would declare it; the relay declares it
    # from the app's queues.
    app.amqp.queues[name] = Queue(name, durable=True, queue_arguments=arguments)
    broker.declare(name, arguments)
    broker.purge(name)
    templates = _templates(helpers)
    helpers.copy_outbox_rows(templates, ROWS)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {OutboxMessage._meta.db_table} SET queue = %s, routing_key = %s, "
            "exchange = '' WHERE status = 'pending'",
            [name, name],
        )
    helpers.check(helpers.pending_count() == ROWS, "the outbox holds the rows to relay")
    with helpers.relay_keeps_its_services(), Relay(app, name=f"bench-{name}") as relay:
        started = time.perf_counter()
        sent = relay.drain(timeout=120)
        elapsed = time.perf_counter() - started
    helpers.check(sent == ROWS, f"the relay dispatched {sent} rows, not {ROWS}")
    depth = broker.wait_depth(name, ROWS)
    helpers.check(depth == ROWS, f"{name} holds {depth} messages, not {ROWS}")
    broker.purge(name)
    helpers.clear_outbox()
    return ROWS / elapsed


def report_rows(f: dict[str, float]) -> list[tuple[str, str, str]]:
    """The report's lines for these figures."""
    return [
        (f"Scaling: {ROWS:,} committed rows, mean of {ROUNDS} interleaved rounds", "", ""),
        ("two relay processes (PostgreSQL, SKIP LOCKED)",
         f"{f['relays_2_msgs_per_s']:,.0f} msg/s", f"{f['relays_2_vs_1']:.2f}x"),
        ("baseline: one relay process",
         f"{f['relays_1_msgs_per_s']:,.0f} msg/s", "1.00x"),
        ("one relay into a quorum queue (x-queue-type: quorum)",
         f"{f['quorum_queue_msgs_per_s']:,.0f} msg/s", f"{f['quorum_vs_classic']:.2f}x"),
        ("baseline: one relay into a classic durable queue",
         f"{f['classic_queue_msgs_per_s']:,.0f} msg/s", "1.00x"),
    ]  # fmt: skip
