"""Worker-side figures: a reliable task's throughput against stock Celery's, and a duplicate's cost.

Throughput: the same task (insert one row) queued 2,000 times, run by one worker process with
the same settings (prefork, 2 processes, prefetch 4): as a ReliableTask in atomic mode (ledger
claim and "done" in the task's transaction) and as a stock Celery task with ``acks_late``. The
rate is counted from the rows' own timestamps, first to last, so the worker's start-up is not
in it. Five rounds each, interleaved, the variant going first alternating (plain then
reliable, reliable then plain, ...); before every run the tables are vacuumed and the database
checkpointed, so no run meets the clean-up of the one before. The ratio is taken in each round
and its median reported, with the lowest and highest, since the machine's speed drifts between
rounds (single rounds of one run have spread from 0.72 to 0.93 on the 2-core development VM,
and the median of three moved by 0.1 between two runs of the same code: five rounds make one
slow or fast round count for less). Celery's Django fixup closes the database connection around
every task, so each task opens one; one more round of each keeps connections between tasks
(``CELERY_DB_REUSE_MAX``), for comparison only.

Duplicate cost: a finished key delivered again, answered by the cache (Redis) without touching
the database: the time of the task call in the worker's execution path, p50 over 2,000 calls,
beside the p50 of first executions through the same path.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

TASKS = 2_000
ROUNDS = 5
DUPLICATE_CALLS = 2_000


def bench_worker(results: Any, processes: Any, wait_for: Callable[..., None]) -> None:
    from django.db import connection, transaction

    from benchmarks.benchapp.models import Order
    from benchmarks.benchapp.tasks import insert_order, plain_insert_order
    from reliable_tasks.models import IdempotencyKey, KeyResult, OutboxMessage
    from reliable_tasks.relay import Relay

    def rate(prefix: str) -> float:
        stamps = list(
            Order.objects.filter(customer__startswith=prefix)
            .order_by("created_at")
            .values_list("created_at", flat=True)
        )
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]).total_seconds()

    tables = [
        connection.ops.quote_name(model._meta.db_table)
        for model in (Order, IdempotencyKey, KeyResult, OutboxMessage)
    ]

    def settle() -> None:
        """The same database state before every run: the dead rows of the last one vacuumed,
        its writes checkpointed, so that neither variant meets the other's clean-up work (an
        autovacuum of the outbox after the relay's drain, a checkpoint) in its measured window."""
        with connection.cursor() as cursor:
            cursor.execute(f"VACUUM (ANALYZE) {', '.join(tables)}")
            cursor.execute("CHECKPOINT")

    def run(task: Any, enqueue: Callable[[], None], offset: int, reuse: bool = False) -> float:
        Order.objects.filter(customer__startswith="worker-").delete()
        enqueue()
        settle()
        env = {"RT_BENCH_DB_REUSE_MAX": "100000"} if reuse else None
        worker = processes.start(
            "-m", "celery", "-A", "benchmarks.celery_app", "worker", "-I", "benchmarks.benchapp.tasks",
            "-Q", task.queue, "-c", "2", "-P", "prefork", "--prefetch-multiplier", "4", "-l", "warning",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"bench-{offset}@%h",
            env=env,
        )  # fmt: skip
        try:
            wait_for(
                lambda: Order.objects.filter(customer__startswith="worker-").count() >= TASKS,
                180,
                "the worker",
            )
        finally:
            processes.stop(worker)
        return rate("worker-")

    def enqueue_reliable() -> None:
        for start in range(0, TASKS, 500):
            with transaction.atomic():
                for number in range(start, start + 500):
                    insert_order.delay(number)
        with Relay() as relay:
            relay.drain(timeout=120)

    def enqueue_plain() -> None:
        for number in range(TASKS):
            plain_insert_order.apply_async((number,))

    reliable, plain = [], []
    for round_ in range(ROUNDS):
        # Which variant goes first alternates, so that a machine slowing down (or speeding up)
        # over the stage favours neither.
        variants = [
            (plain, plain_insert_order, enqueue_plain),
            (reliable, insert_order, enqueue_reliable),
        ]
        for number, (rates, task, enqueue) in enumerate(variants[:: 1 if round_ % 2 == 0 else -1]):
            rates.append(run(task, enqueue, 2 * round_ + number))
    ratios = [r / p for r, p in zip(reliable, plain, strict=True)]
    results.figures["worker_reliable_tasks_per_s"] = statistics.median(reliable)
    results.figures["worker_plain_acks_late_tasks_per_s"] = statistics.median(plain)
    results.figures["worker_reliable_vs_plain"] = statistics.median(ratios)
    results.figures["worker_reliable_vs_plain_min"] = min(ratios)
    results.figures["worker_reliable_vs_plain_max"] = max(ratios)
    reused_plain = run(plain_insert_order, enqueue_plain, 2 * ROUNDS, reuse=True)
    reused_reliable = run(insert_order, enqueue_reliable, 2 * ROUNDS + 1, reuse=True)
    results.figures["worker_reused_plain_tasks_per_s"] = reused_plain
    results.figures["worker_reused_reliable_tasks_per_s"] = reused_reliable
    results.figures["worker_reused_reliable_vs_plain"] = reused_reliable / reused_plain
    Order.objects.filter(customer__startswith="worker-").delete()


def bench_duplicates(results: Any) -> None:
    """Executions in this process, as a worker process runs them: a worker sends an execution's
    cache writes at its end from a thread (``worker_init`` turns this on; here it is set)."""
    from django.core.cache import cache

    from benchmarks.benchapp.tasks import insert_order
    from reliable_tasks import ledger

    cache.clear()

    def call(task_id: str, number: int) -> float:
        insert_order.push_request(
            id=task_id, called_directly=False, args=(number,), kwargs={}, retries=0,
            hostname="bench", delivery_info={"redelivered": False},
        )  # fmt: skip
        try:
            started = time.perf_counter()
            insert_order(number)
            return (time.perf_counter() - started) * 1000
        finally:
            insert_order.pop_request()

    ledger.done_cache.in_background = True
    try:
        firsts = [call(f"bench-first-{n}", 10_000_000 + n) for n in range(500)]
        call("bench-duplicate", 20_000_000)  # done once; every call after it is a duplicate
        ledger.done_cache.flush()  # its done key is in the cache before the duplicates come
        duplicates = [call("bench-duplicate", 20_000_000) for _ in range(DUPLICATE_CALLS)]
    finally:
        ledger.done_cache.flush()
        ledger.done_cache.in_background = False
    results.figures["duplicate_hit_p50_ms"] = statistics.median(duplicates)
    results.figures["duplicate_hit_p99_ms"] = statistics.quantiles(duplicates, n=100)[98]
    results.figures["first_execution_p50_ms"] = statistics.median(firsts)
