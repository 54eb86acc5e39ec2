"""Benchmark reliable_tasks against stock Celery on the local PostgreSQL and RabbitMQ.

Run by ``make bench``. Every figure is measured in this run, baselines included, on a fresh
database (``rt_bench``) and on queues of its own (``rt-bench-<random>``), which are dropped at
the end. It prints a table, then, as its last line, one JSON object with the figures.

What is measured:

1. Relay throughput: 20,000 committed outbox rows, one relay, until all are confirmed by
   RabbitMQ and marked; against stock Celery ``apply_async`` with ``confirm_publish=True``.
   Three rounds of each, interleaved; the median of each is reported, beside its spread.
2. Cost of one business transaction that inserts an ``Order`` and enqueues a task: the
   outbox (``.delay()`` in ``transaction.atomic()``) against Celery's ``delay_on_commit``.
3. Commit-to-publish latency: 200 transactions a second for 10 s, a relay process
   (``python -m django reliable_tasks relay``), and a raw AMQP consumer noting arrivals.
4. The relay process's memory over 100,000 messages.

The test suites running beside it restart RabbitMQ and PostgreSQL to inject faults; a stage
they disturb is measured again, and the table says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import operator
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
# Run as a script (benchmarks/run.py): the repository root holds the packages.
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")

import django  # noqa: E402 - the path and the settings module come first
import kombu.exceptions  # noqa: E402
import psycopg  # noqa: E402
from kombu import Connection, Queue  # noqa: E402

from benchmarks import scaling, worker  # noqa: E402

T = TypeVar("T")

RELAY_ROWS = 20_000
APPLY_ASYNC_MESSAGES = 3_000
THROUGHPUT_ROUNDS = 3  # relay and apply_async, interleaved; the median is reported
TRANSACTIONS = 1_500  # per variant, in interleaved rounds
ROUNDS = 3
LATENCY_RATE = 200  # transactions per second
LATENCY_SECONDS = 10.0
RSS_MESSAGES = 100_000
RSS_WARMUP_MESSAGES = 20_000
RSS_CHUNK = 10_000

TARGET_RELAY_MSGS_PER_S = 5_000
TARGET_RELAY_VS_CELERY = 5.0
TARGET_ENQUEUE_RATIO = 0.6
TARGET_P50_MS = 10.0
TARGET_P99_MS = 50.0
TARGET_RSS_GROWTH_MB = 20.0
TARGET_WORKER_RATIO = 0.8
TARGET_DUPLICATE_MS = 1.0


# --------------------------------------------------------------------------------------------
# Services


def recreate_database(name: str) -> None:
    """Drop and create the benchmark's database (never the test suite's)."""
    with psycopg.connect(
        host="127.0.0.1",
        user=os.environ.get("PGUSER", "postgres"),
        dbname="postgres",
        autocommit=True,
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(name: str) -> None:
    from django.db import connections

    connections.close_all()
    with psycopg.connect(
        host="127.0.0.1",
        user=os.environ.get("PGUSER", "postgres"),
        dbname="postgres",
        autocommit=True,
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wait_for_services(timeout: float = 120.0, settle: float = 0.0) -> None:
    """Wait until PostgreSQL and RabbitMQ answer (for ``settle`` seconds in a row).

    The test suites running beside the benchmark stop and start them to inject faults.
    """
    for name, port in (("PostgreSQL", 5432), ("RabbitMQ", 5672)):
        deadline = time.monotonic() + timeout
        up_since: float | None = None
        while True:
            now = time.monotonic()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                up_since = now if up_since is None else up_since
                if now - up_since >= settle:
                    break
            except OSError:
                up_since = None
                if now > deadline:
                    raise Check(f"{name} is not reachable on 127.0.0.1:{port}") from None
            time.sleep(0.5)


class ServiceRestarted(Exception):
    """RabbitMQ or PostgreSQL went away during a stage: the test suites beside us restart them."""


class Broker:
    """Raw access to the benchmark's queues: declare, count, purge, delete.

    Reconnects when RabbitMQ was restarted under it (the test suite's fault tests do that).
    """

    def __init__(self, url: str, queues: tuple[str, ...]) -> None:
        self.url = url
        self.queues = queues
        self.connection = Connection(url)
        self.errors: tuple[type[BaseException], ...] = (
            *self.connection.connection_errors,
            kombu.exceptions.OperationalError,
            OSError,
        )
        self.channel: Any = None
        self.server_version = "?"
        self.reconnect()

    def reconnect(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.release()
        wait_for_services()
        self.connection = Connection(self.url)
        self.connection.connect()
        self.channel = self.connection.channel()
        self.server_version = str(self.connection.connection.server_properties.get("version", "?"))
        for name in self.queues:
            # Declared as Celery declares its queues, so every party agrees on them.
            Queue(name, durable=True)(self.channel).declare()

    def _run(self, operation: Callable[[Any], T]) -> T:
        try:
            return operation(self.channel)
        except self.errors:
            self.reconnect()
            return operation(self.channel)

    def depth(self, name: str) -> int:
        _, count, _ = self._run(lambda channel: channel.queue_declare(name, passive=True))
        return int(count)

    def wait_depth(self, name: str, expected: int, timeout: float = 30.0) -> int:
        """The queue's depth once it reached ``expected`` (or whatever it is at the timeout)."""
        deadline = time.monotonic() + timeout
        while (depth := self.depth(name)) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return depth

    def purge(self, name: str) -> None:
        self._run(lambda channel: channel.queue_purge(name))

    def declare(self, name: str, arguments: dict[str, Any] | None = None) -> None:
        self._run(
            lambda channel: Queue(name, durable=True, queue_arguments=arguments)(channel).declare()
        )

    def delete(self, name: str) -> None:
        self._run(operator.methodcaller("queue_delete", name))

    def delete_all(self) -> None:
        for name in self.queues:
            self._run(operator.methodcaller("queue_delete", name))

    def close(self) -> None:
        self.connection.release()


# What the relay logs when it loses the broker or the database (and retries).
_OUTAGES = ("broker unavailable", "database unavailable")


class _RelayOutage(logging.Handler):
    """Notices the relay saying that it lost the broker or the database."""

    seen = False

    def emit(self, record: logging.LogRecord) -> None:
        if any(outage in record.getMessage() for outage in _OUTAGES):
            self.seen = True


@contextmanager
def relay_keeps_its_services() -> Iterator[None]:
    """Raise ServiceRestarted if the in-process relay lost the broker or database meanwhile."""
    handler = _RelayOutage(logging.WARNING)
    relay_logger = logging.getLogger("reliable_tasks.relay")
    relay_logger.addHandler(handler)
    try:
        yield
    finally:
        relay_logger.removeHandler(handler)
    if handler.seen:
        raise ServiceRestarted("the relay lost a service during the measurement")


def check_relay_log(log: str) -> None:
    if any(outage in log for outage in _OUTAGES):
        raise ServiceRestarted("the relay process lost a service during the measurement")


class Check(Exception):
    """A benchmark's own verification failed: its figures would mean nothing."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Check(what)


# --------------------------------------------------------------------------------------------
# Business transactions


def new_order(i: int) -> Any:
    from benchmarks.benchapp.models import Order

    return Order.objects.create(customer=f"customer-{i % 97}", amount_cents=1000 + i % 5000)


def outbox_transaction(i: int) -> str:
    """The reliable way: the order and the task's outbox row commit together."""
    from django.db import transaction

    from benchmarks.benchapp.tasks import fulfil_order

    with transaction.atomic():
        order = new_order(i)
        return str(fulfil_order.delay(order.pk).id)


def delay_on_commit_transaction(i: int) -> None:
    """Stock Celery, confirmed: publish after the commit and wait for the broker's confirm."""
    from django.db import transaction

    from benchmarks.benchapp.tasks import plain_fulfil_order

    with transaction.atomic():
        order = new_order(i)
        plain_fulfil_order.delay_on_commit(order.pk)


def unconfirmed_delay_on_commit_transaction(i: int) -> None:
    """Stock Celery's default: publish after the commit, no confirm (a broker hiccup loses it)."""
    from django.db import transaction

    from benchmarks.benchapp.tasks import unconfirmed_fulfil_order

    with transaction.atomic():
        order = new_order(i)
        unconfirmed_fulfil_order.delay_on_commit(order.pk)


def order_only_transaction(i: int) -> None:
    """The business write alone: what every variant pays before enqueueing."""
    from django.db import transaction

    with transaction.atomic():
        new_order(i)


# --------------------------------------------------------------------------------------------
# Outbox helpers


def pending_count() -> int:
    from reliable_tasks.models import OutboxMessage, OutboxStatus

    return OutboxMessage.objects.filter(status=OutboxStatus.PENDING).count()


def clear_outbox() -> None:
    from django.db import connection

    from reliable_tasks.models import OutboxMessage

    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {OutboxMessage._meta.db_table}")


def enqueue_templates(count: int = 500) -> list[int]:
    """Enqueue ``count`` real tasks in one transaction; return their outbox row ids."""
    from django.db import transaction

    from benchmarks.benchapp.tasks import fulfil_order
    from reliable_tasks.models import OutboxMessage

    with transaction.atomic():
        task_ids = [fulfil_order.delay(i).id for i in range(count)]
    return list(OutboxMessage.objects.filter(task_id__in=task_ids).values_list("id", flat=True))


def copy_outbox_rows(template_ids: list[int], count: int) -> None:
    """Insert ``count`` pending copies of real outbox rows, each with a task id of its own.

    Enqueueing 100,000 tasks through ``.delay()`` would take most of the time budget; the
    relay cannot tell these rows from enqueued ones. The copy names every column of the
    model, so a column added later is copied too.
    """
    from django.db import connection, transaction

    from reliable_tasks.models import OutboxMessage

    fresh = {
        "task_id": "t.new_id",
        "headers": "jsonb_set(jsonb_set(t.headers, '{id}', to_jsonb(t.new_id)), '{root_id}', to_jsonb(t.new_id))",
        "properties": "jsonb_set(t.properties, '{correlation_id}', to_jsonb(t.new_id))",
        # The AMQP table of the same headers: the id's bytes replaced (a uuid's length does not
        # change, so neither does the table's).
        "header_table": (
            "decode(replace(encode(t.header_table, 'hex'), encode(convert_to(t.task_id, 'UTF8'), "
            "'hex'), encode(convert_to(t.new_id, 'UTF8'), 'hex')), 'hex')"
        ),
        "status": "'pending'",
        "created_at": "now()",
        "due_at": "now()",
        "dispatched_at": "NULL",
        "publish_attempts": "0",
        "last_error": "''",
    }
    columns = [str(f.column) for f in OutboxMessage._meta.concrete_fields if not f.primary_key]
    values = [fresh.get(column, f"t.{column}") for column in columns]
    table = OutboxMessage._meta.db_table
    # One transaction: the relay sees the rows (and is woken) only once the statistics are in.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) "
            f"SELECT {', '.join(values)} "
            f"FROM (SELECT o.*, gen_random_uuid()::text AS new_id FROM {table} o, "
            "generate_series(1, %s) WHERE o.id = ANY(%s) LIMIT %s) t",
            [-(-count // len(template_ids)), template_ids, count],
        )
        # A table that has lived has statistics (autovacuum sees to it); without them the
        # planner sorts every pending row on each claim instead of reading the claim's index.
        cursor.execute(f"ANALYZE {table}")


def wait_until_relayed(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pending_count():
        if time.monotonic() > deadline:
            raise Check(f"the relay left {pending_count()} rows pending after {timeout} s")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# Processes


@dataclass
class Processes:
    """Subprocesses of the benchmark, with their logs; all are ended at exit."""

    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, *argv: str, log: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        out: Any = subprocess.PIPE
        if log:
            out = tempfile.NamedTemporaryFile(prefix="rt-bench-", suffix=".log", delete=False)  # noqa: SIM115 - read after the process ends
        proc = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, env={**self.env, **(env or {})}, stdout=out,
            stderr=subprocess.STDOUT if log else None, start_new_session=True,
        )  # fmt: skip
        proc.log_path = out.name if log else None  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    @staticmethod
    def log_of(proc: subprocess.Popen[bytes]) -> str:
        path = getattr(proc, "log_path", None)
        return Path(path).read_text(errors="replace") if path else ""

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.stop(proc, timeout=5)
            path = getattr(proc, "log_path", None)
            if path:
                Path(path).unlink(missing_ok=True)
        self.procs.clear()


def cpu_pressure() -> str:
    """Share of the last minute in which some runnable task waited for a CPU (Linux PSI)."""
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "n/a"
    fields = dict(field.split("=") for field in some.split()[1:])
    return f"{float(fields['avg60']):.0f}%"


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc/<pid>/status, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise Check(f"no VmRSS for process {pid}")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise Check(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# The measurements


@dataclass
class Results:
    figures: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def relay_drain(broker: Broker, queue: str) -> float:
    """20,000 committed rows, one in-process relay, until all are confirmed and marked: msg/s."""
    from benchmarks.celery_app import app
    from reliable_tasks.relay import Relay

    clear_outbox()
    templates = enqueue_templates()
    copy_outbox_rows(templates, RELAY_ROWS - len(templates))
    check(pending_count() == RELAY_ROWS, "the outbox holds the rows to relay")
    broker.purge(queue)

    with relay_keeps_its_services(), Relay(app, name="bench-drain") as relay:
        started = time.perf_counter()
        sent = relay.drain(timeout=120)
        elapsed = time.perf_counter() - started
    check(sent == RELAY_ROWS, f"the relay dispatched {sent} rows, not {RELAY_ROWS}")
    check(pending_count() == 0, "no row is left pending")
    depth = broker.depth(queue)
    check(depth == RELAY_ROWS, f"the queue holds {depth} messages, not {RELAY_ROWS}")
    broker.purge(queue)
    clear_outbox()
    return RELAY_ROWS / elapsed


def apply_async_rate(broker: Broker, queue: str, task: Any) -> float:
    """Stock Celery ``apply_async`` of APPLY_ASYNC_MESSAGES messages, one after the other: msg/s."""
    task.apply_async((0,))  # connects and declares: not part of the figure
    broker.wait_depth(queue, 1)
    broker.purge(queue)
    started = time.perf_counter()
    for i in range(APPLY_ASYNC_MESSAGES):
        task.apply_async((i,))
    elapsed = time.perf_counter() - started
    depth = broker.wait_depth(queue, APPLY_ASYNC_MESSAGES)
    check(depth == APPLY_ASYNC_MESSAGES, f"{task.name}: the queue holds {depth} messages")
    broker.purge(queue)
    return APPLY_ASYNC_MESSAGES / elapsed


def bench_throughput(results: Results, broker: Broker, queue: str, celery_queue: str) -> None:
    """The relay's drain against Celery's ``apply_async`` (with and without publisher
    confirms), in THROUGHPUT_ROUNDS interleaved rounds; each figure is the median of its
    rounds, so that a moment of a busy machine falls on all three or on one round only."""
    from benchmarks.benchapp.tasks import plain_fulfil_order, unconfirmed_fulfil_order

    measures: dict[str, Callable[[], float]] = {
        "relay_msgs_per_s": lambda: relay_drain(broker, queue),
        "celery_confirmed_apply_async_per_s": lambda: apply_async_rate(
            broker, celery_queue, plain_fulfil_order
        ),
        "celery_unconfirmed_apply_async_per_s": lambda: apply_async_rate(
            broker, celery_queue, unconfirmed_fulfil_order
        ),
    }
    rounds: dict[str, list[float]] = {key: [] for key in measures}
    for _ in range(THROUGHPUT_ROUNDS):
        for key, measure in measures.items():
            rounds[key].append(measure())
    for key, rates in rounds.items():
        results.figures[key] = statistics.median(rates)
        results.figures[f"{key}_min"] = min(rates)
        results.figures[f"{key}_max"] = max(rates)


def bench_transactions(results: Results, broker: Broker, celery_queue: str) -> None:
    """One business transaction (an Order, one task) per variant, in interleaved rounds."""
    from benchmarks.benchapp.models import Order

    Order.objects.all().delete()
    clear_outbox()
    broker.purge(celery_queue)
    variants: dict[str, Callable[[int], object]] = {
        "outbox_txn_ms": outbox_transaction,
        "delay_on_commit_txn_ms": delay_on_commit_transaction,
        "delay_on_commit_unconfirmed_txn_ms": unconfirmed_delay_on_commit_transaction,
        "order_only_txn_ms": order_only_transaction,
    }
    for run in variants.values():  # connections, prepared code paths
        for i in range(50):
            run(i)
    per_round = TRANSACTIONS // ROUNDS
    spent = dict.fromkeys(variants, 0.0)
    for _ in range(ROUNDS):
        for key, run in variants.items():
            started = time.perf_counter()
            for i in range(per_round):
                run(i)
            spent[key] += time.perf_counter() - started
    done = per_round * ROUNDS
    for key, seconds in spent.items():
        results.figures[key] = seconds / done * 1000
    # Every variant did what it claims: rows written, messages in the queue.
    check(pending_count() == 50 + done, "one outbox row per outbox transaction")
    published = broker.wait_depth(celery_queue, 2 * (50 + done))
    check(published == 2 * (50 + done), f"delay_on_commit published {published} messages")
    check(Order.objects.count() == 4 * (50 + done), "one order per transaction")
    broker.purge(celery_queue)
    clear_outbox()


def bench_latency_and_memory(
    results: Results, broker: Broker, queue: str, processes: Processes
) -> None:
    """Commit-to-arrival latency at a steady rate, then the relay process's memory."""
    from reliable_tasks.models import OutboxMessage, RelayHeartbeat

    warmup = LATENCY_RATE // 2
    measured = int(LATENCY_RATE * LATENCY_SECONDS)
    processes.stop_all()  # what an interrupted attempt left
    clear_outbox()
    RelayHeartbeat.objects.all().delete()
    broker.purge(queue)
    consumer = processes.start(
        "-m", "benchmarks.consumer", queue, str(warmup + measured), str(LATENCY_SECONDS + 60),
        log=False,
    )  # fmt: skip
    assert consumer.stdout is not None
    check(consumer.stdout.readline().strip() == b"ready", "the consumer started")
    relay = processes.start("-m", "django", "reliable_tasks", "relay", "--name", "bench-relay")
    wait_for(
        lambda: RelayHeartbeat.objects.filter(name="bench-relay").exists() or relay.poll() is not None,
        30, "the relay's first heartbeat",
    )  # fmt: skip
    check(relay.poll() is None, f"the relay runs:\n{processes.log_of(relay)}")

    def produce(count: int) -> tuple[dict[str, float], float]:
        """``count`` transactions at LATENCY_RATE; their commit times, and the rate achieved."""
        committed: dict[str, float] = {}
        started = time.perf_counter()
        for i in range(count):
            pause = started + i / LATENCY_RATE - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            task_id = outbox_transaction(i)
            committed[task_id] = time.time()
        return committed, count / (time.perf_counter() - started)

    # The warm-up takes the relay's first-batch costs (connections, queue declarations).
    produce(warmup)
    wait_until_relayed(timeout=30)
    committed, achieved = produce(measured)
    out, _ = consumer.communicate(timeout=LATENCY_SECONDS + 90)
    check_relay_log(processes.log_of(relay))
    arrived: dict[str, float] = json.loads(out)
    missing = committed.keys() - arrived.keys()
    check(not missing, f"{len(missing)} committed tasks never reached the consumer")
    latencies = sorted((arrived[t] - committed[t]) * 1000 for t in committed)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    results.figures["commit_to_publish_p50_ms"] = statistics.median(latencies)
    results.figures["commit_to_publish_p99_ms"] = cuts[98]
    results.figures["commit_to_publish_max_ms"] = latencies[-1]
    results.figures["latency_transactions_per_s"] = achieved

    # Memory: the same relay process, 100,000 more messages after a warm-up.
    templates = list(OutboxMessage.objects.values_list("id", flat=True))

    def relay_chunks(total: int) -> float:
        """Relay ``total`` rows in chunks; return the seconds the relay spent on them."""
        busy = 0.0
        for _ in range(total // RSS_CHUNK):
            copy_outbox_rows(templates, RSS_CHUNK)
            committed = time.perf_counter()
            wait_until_relayed(timeout=120)
            busy += time.perf_counter() - committed
            depth = broker.wait_depth(queue, RSS_CHUNK, timeout=5)
            if depth != RSS_CHUNK:
                log = processes.log_of(relay)
                check_relay_log(log)
                raise Check(f"the queue holds {depth} messages, not {RSS_CHUNK}; relay log:\n{log}")
            # Keeps RabbitMQ from paging messages to disk, which would slow it, not the relay.
            broker.purge(queue)
        return busy

    relay_chunks(RSS_WARMUP_MESSAGES)
    before = rss_mb(relay.pid)
    elapsed = relay_chunks(RSS_MESSAGES)
    after = rss_mb(relay.pid)
    check_relay_log(processes.log_of(relay))
    results.figures["relay_rss_start_mb"] = before
    results.figures["relay_rss_end_mb"] = after
    results.figures["relay_rss_growth_mb"] = after - before
    results.figures["relay_process_msgs_per_s"] = RSS_MESSAGES / elapsed
    code = processes.stop(relay)
    check(code == 0, f"the relay stopped cleanly (exit {code}):\n{processes.log_of(relay)}")


# --------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Target:
    name: str
    key: str
    met: bool
    measured: str
    baseline: str


def targets(f: dict[str, float]) -> list[Target]:
    relay, confirmed = f["relay_msgs_per_s"], f["celery_confirmed_apply_async_per_s"]
    doc, outbox = f["delay_on_commit_txn_ms"], f["outbox_txn_ms"]
    return [
        Target(
            f"relay >= {TARGET_RELAY_MSGS_PER_S:,} msg/s", "relay_msgs_per_s",
            relay >= TARGET_RELAY_MSGS_PER_S, f"{relay:,.0f} msg/s", "",
        ),
        Target(
            f"relay >= {TARGET_RELAY_VS_CELERY:g}x confirmed apply_async", "relay_vs_celery_confirmed",
            f["relay_vs_celery_confirmed"] >= TARGET_RELAY_VS_CELERY,
            f"{f['relay_vs_celery_confirmed']:.1f}x", f"apply_async {confirmed:,.0f} msg/s",
        ),
        Target(
            f"enqueue <= {TARGET_ENQUEUE_RATIO:g}x delay_on_commit", "enqueue_vs_delay_on_commit",
            f["enqueue_vs_delay_on_commit"] <= TARGET_ENQUEUE_RATIO,
            f"{f['enqueue_vs_delay_on_commit']:.2f}x ({outbox:.3f} ms)",
            f"delay_on_commit {doc:.3f} ms",
        ),
        Target(
            f"commit->publish p50 <= {TARGET_P50_MS:g} ms", "commit_to_publish_p50_ms",
            f["commit_to_publish_p50_ms"] <= TARGET_P50_MS,
            f"{f['commit_to_publish_p50_ms']:.1f} ms", "",
        ),
        Target(
            f"commit->publish p99 <= {TARGET_P99_MS:g} ms", "commit_to_publish_p99_ms",
            f["commit_to_publish_p99_ms"] <= TARGET_P99_MS,
            f"{f['commit_to_publish_p99_ms']:.1f} ms", "",
        ),
        Target(
            f"relay RSS growth < {TARGET_RSS_GROWTH_MB:g} MB", "relay_rss_growth_mb",
            f["relay_rss_growth_mb"] < TARGET_RSS_GROWTH_MB,
            f"{f['relay_rss_growth_mb']:+.1f} MB", f"{f['relay_rss_start_mb']:.1f} MB after warm-up",
        ),
        Target(
            f"worker reliable >= {TARGET_WORKER_RATIO:g}x plain acks_late", "worker_reliable_vs_plain",
            f["worker_reliable_vs_plain"] >= TARGET_WORKER_RATIO, f"{f['worker_reliable_vs_plain']:.2f}x",
            f"plain {f['worker_plain_acks_late_tasks_per_s']:,.0f} tasks/s",
        ),
        Target(
            f"duplicate hit p50 <= {TARGET_DUPLICATE_MS:g} ms", "duplicate_hit_p50_ms",
            f["duplicate_hit_p50_ms"] <= TARGET_DUPLICATE_MS, f"{f['duplicate_hit_p50_ms']:.3f} ms",
            f"first run {f['first_execution_p50_ms']:.3f} ms",
        ),
    ]  # fmt: skip


def print_report(f: dict[str, float], notes: dict[str, str], header: str) -> list[Target]:
    f["relay_vs_celery_confirmed"] = f["relay_msgs_per_s"] / f["celery_confirmed_apply_async_per_s"]
    f["enqueue_vs_delay_on_commit"] = f["outbox_txn_ms"] / f["delay_on_commit_txn_ms"]
    f["enqueue_vs_delay_on_commit_unconfirmed"] = (
        f["outbox_txn_ms"] / f["delay_on_commit_unconfirmed_txn_ms"]
    )
    confirmed = f["celery_confirmed_apply_async_per_s"]
    doc = f["delay_on_commit_txn_ms"]

    def spread(key: str) -> tuple[str, str, str]:
        return (
            "  (its rounds: lowest / highest)",
            f"{f[key + '_min']:,.0f} / {f[key + '_max']:,.0f}",
            "",
        )

    rows = [
        (f"Throughput (median of {THROUGHPUT_ROUNDS} interleaved rounds)", "", ""),
        (f"relay: {RELAY_ROWS:,} rows -> confirmed, one relay (in-process drain)",
         f"{f['relay_msgs_per_s']:,.0f} msg/s", f"{f['relay_msgs_per_s'] / confirmed:.1f}x"),
        spread("relay_msgs_per_s"),
        (f"relay process: {RSS_MESSAGES:,} rows (NOTIFY-driven run loop)",
         f"{f['relay_process_msgs_per_s']:,.0f} msg/s",
         f"{f['relay_process_msgs_per_s'] / confirmed:.1f}x"),
        (f"baseline: Celery apply_async, confirm_publish=True, {APPLY_ASYNC_MESSAGES:,} msgs",
         f"{confirmed:,.0f} msg/s", "1.0x"),
        spread("celery_confirmed_apply_async_per_s"),
        (f"  (Celery apply_async, no confirms, {APPLY_ASYNC_MESSAGES:,} msgs)",
         f"{f['celery_unconfirmed_apply_async_per_s']:,.0f} msg/s",
         f"{f['celery_unconfirmed_apply_async_per_s'] / confirmed:.1f}x"),
        (f"One transaction: insert an Order, enqueue one task ({TRANSACTIONS:,} each)", "", ""),
        ("outbox: task.delay() inside transaction.atomic()",
         f"{f['outbox_txn_ms']:.3f} ms", f"{f['outbox_txn_ms'] / doc:.2f}x"),
        ("baseline: Celery delay_on_commit, confirm_publish=True",
         f"{doc:.3f} ms", "1.00x"),
        ("  (Celery delay_on_commit, no confirms: can lose the task)",
         f"{f['delay_on_commit_unconfirmed_txn_ms']:.3f} ms",
         f"{f['delay_on_commit_unconfirmed_txn_ms'] / doc:.2f}x"),
        ("  (the Order alone, no task)",
         f"{f['order_only_txn_ms']:.3f} ms", f"{f['order_only_txn_ms'] / doc:.2f}x"),
        (f"Commit -> raw consumer receives ({f['latency_transactions_per_s']:.0f} tx/s, "
         f"{LATENCY_SECONDS:g} s, relay process)", "", ""),
        ("p50", f"{f['commit_to_publish_p50_ms']:.1f} ms", ""),
        ("p99", f"{f['commit_to_publish_p99_ms']:.1f} ms", ""),
        ("max", f"{f['commit_to_publish_max_ms']:.1f} ms", ""),
        (f"Relay process memory (VmRSS), {RSS_MESSAGES:,} messages after "
         f"{RSS_WARMUP_MESSAGES:,} of warm-up", "", ""),
        ("after warm-up", f"{f['relay_rss_start_mb']:.1f} MB", ""),
        ("at the end", f"{f['relay_rss_end_mb']:.1f} MB", ""),
        ("growth", f"{f['relay_rss_growth_mb']:+.1f} MB", ""),
        (f"Worker: a task inserting one row, {worker.TASKS:,} queued, 1 worker (prefork 2, prefetch 4); "
         f"median of {worker.ROUNDS} interleaved rounds", "", ""),
        ("ReliableTask, atomic mode (ledger claim and done in the task's transaction)",
         f"{f['worker_reliable_tasks_per_s']:,.0f} tasks/s", f"{f['worker_reliable_vs_plain']:.2f}x"),
        ("  (its rounds' ratios: lowest / highest)",
         f"{f['worker_reliable_vs_plain_min']:.2f} / {f['worker_reliable_vs_plain_max']:.2f}", ""),
        ("baseline: stock Celery task, acks_late=True",
         f"{f['worker_plain_acks_late_tasks_per_s']:,.0f} tasks/s", "1.00x"),
        ("  (both again, connections kept between tasks: CELERY_DB_REUSE_MAX)", "", ""),
        ("  (ReliableTask)", f"{f['worker_reused_reliable_tasks_per_s']:,.0f} tasks/s",
         f"{f['worker_reused_reliable_vs_plain']:.2f}x"),
        ("  (stock Celery task)", f"{f['worker_reused_plain_tasks_per_s']:,.0f} tasks/s", "1.00x"),
        *scaling.report_rows(f),
        (f"A duplicate answered by the cache (Redis), {worker.DUPLICATE_CALLS:,} calls", "", ""),
        ("duplicate p50", f"{f['duplicate_hit_p50_ms']:.3f} ms",
         f"{f['duplicate_hit_p50_ms'] / f['first_execution_p50_ms']:.2f}x"),
        ("duplicate p99", f"{f['duplicate_hit_p99_ms']:.3f} ms", ""),
        ("baseline: a first execution through the same path, p50",
         f"{f['first_execution_p50_ms']:.3f} ms", "1.00x"),
    ]  # fmt: skip
    print(header)
    print()
    print(f"{'measurement':<76}{'figure':>16}{'vs baseline':>13}")
    for label, figure, ratio in rows:
        if not figure:
            print(f"\n{label}")
        else:
            print(f"  {label:<74}{figure:>16}{ratio:>13}")
    print()
    for stage_name, note in notes.items():
        print(f"note: {stage_name}: {note}")
    checks = targets(f)
    print(f"{'target':<46}{'measured':>22}  {'baseline':<28}{'met':>4}")
    for t in checks:
        print(f"{t.name:<46}{t.measured:>22}  {t.baseline:<28}{'yes' if t.met else 'NO':>4}")
    print()
    return checks


def run_stage(
    name: str, measure: Callable[[], None], broker: Broker, results: Results, attempts: int = 5
) -> None:
    """Run one stage; again if RabbitMQ was restarted under it (its figures would be wrong)."""
    from django.db import connections
    from django.db.utils import InterfaceError, OperationalError

    restarted: tuple[type[BaseException], ...] = (
        ServiceRestarted,
        OperationalError,
        InterfaceError,
        *broker.errors,
    )
    for attempt in range(1, attempts + 1):
        print(f"... {name}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            measure()
        except restarted as exc:
            if attempt == attempts:
                raise
            print(
                f"    a service went away ({exc!r}); measuring again", file=sys.stderr, flush=True
            )
            results.notes[name] = f"measured {attempt + 1} times: a service was restarted under it"
            wait_for_services(settle=5.0)
            connections.close_all()
            broker.reconnect()
            continue
        print(f"    {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        return


def main() -> int:
    from benchmarks import settings

    bench_started = time.perf_counter()
    pressure_before = cpu_pressure()
    db_name = settings.DATABASES["default"]["NAME"]
    wait_for_services()
    recreate_database(db_name)
    django.setup()

    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    queues = (settings.QUEUE, settings.CELERY_QUEUE)
    broker = Broker(settings.BROKER_URL, queues)
    processes = Processes(env={**os.environ, "PYTHONPATH": str(ROOT)})
    results = Results()
    try:
        run_stage(
            f"relay ({RELAY_ROWS:,} rows) and Celery apply_async ({APPLY_ASYNC_MESSAGES:,} "
            f"messages, twice), {THROUGHPUT_ROUNDS} rounds",
            lambda: bench_throughput(results, broker, settings.QUEUE, settings.CELERY_QUEUE),
            broker,
            results,
        )
        run_stage(
            f"business transactions ({TRANSACTIONS:,} per variant)",
            lambda: bench_transactions(results, broker, settings.CELERY_QUEUE),
            broker,
            results,
        )
        run_stage(
            f"latency ({LATENCY_SECONDS:g} s) and relay memory ({RSS_MESSAGES:,} messages)",
            lambda: bench_latency_and_memory(results, broker, settings.QUEUE, processes),
            broker,
            results,
        )
        run_stage(
            f"scaling: one and two relay processes, classic and quorum queues "
            f"({scaling.ROWS:,} rows x {scaling.ROUNDS} rounds each)",
            lambda: scaling.bench_scaling(
                results, broker, settings.QUEUE, processes, sys.modules[__name__]
            ),
            broker,
            results,
        )
        run_stage(
            f"worker throughput ({worker.TASKS:,} tasks x {worker.ROUNDS} rounds, each variant)",
            lambda: worker.bench_worker(results, processes, wait_for),
            broker,
            results,
        )
        run_stage(
            f"duplicate hits ({worker.DUPLICATE_CALLS:,} calls)",
            lambda: worker.bench_duplicates(results),
            broker,
            results,
        )
        pg_version = connection.cursor().connection.info.server_version
    finally:
        processes.stop_all()
        broker.delete_all()
        broker.close()
        drop_database(db_name)

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    header = (
        f"reliable_tasks benchmark: {os.cpu_count()} CPUs, load {load} at the end, CPU pressure "
        f"(tasks waiting for a CPU, last minute) {pressure_before} before and {cpu_pressure()} "
        "after;\n"
        f"Python {platform.python_version()}, PostgreSQL {pg_version // 10000}.{pg_version % 10000}, "
        f"RabbitMQ {broker.server_version}, Celery {version('celery')}, kombu {version('kombu')}, "
        f"py-amqp {version('amqp')}, Django {version('django')}; ran {time.perf_counter() - bench_started:.0f} s"
    )
    figures = results.figures
    checks = print_report(figures, results.notes, header)
    summary: dict[str, Any] = {key: round(value, 4) for key, value in figures.items()}
    summary["targets_met"] = {t.key: t.met for t in checks}
    summary["all_targets_met"] = all(t.met for t in checks)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
