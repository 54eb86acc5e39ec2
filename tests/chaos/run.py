"""One chaos run: enqueue under faults, wait for the pipeline to drain, check, print the table.

The run has a database (``rt_chaos_<pid>``), a queue (``rt-chaos-<pid>``) and a Redis database
(12, which the test sessions do not flush) of its own; its business ids carry a token of the
run, so that runs sharing Redis's cache of done keys never answer each other's tasks. Call
``configure()`` before Django is set up, then ``main()``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import plan
from .fleet import (
    ROOT,
    Fleet,
    ensure_services,
    port_open,
    queue_counts,
    rabbitmq_start,
    rabbitmqctl,
    redis_start,
    redis_stop,
    redis_up,
    service_lock,
)

#: Set by SIGTERM or Ctrl-C: the run stops where it is and cleans up. The handler only sets
#: this: an exception raised from a signal handler can interrupt ``Thread.join()``, which on
#: Python 3.11 then reports a thread still running as ended, and the cleanup would not wait
#: for an outage in progress.
CUT_SHORT = threading.Event()

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = "redis://127.0.0.1:6379/12"
ENQUEUES_PER_TRANSACTION = 25


class CutShort(Exception):
    """The run was asked to stop (``CUT_SHORT``)."""


def install_signal_handlers() -> None:
    def cut_short(signum: int, frame: object) -> None:
        if CUT_SHORT.is_set():
            raise KeyboardInterrupt  # a second signal: stop cleaning up too
        CUT_SHORT.set()

    signal.signal(signal.SIGTERM, cut_short)
    signal.signal(signal.SIGINT, cut_short)


def _wait_for(*threads: threading.Thread) -> None:
    while any(thread.is_alive() for thread in threads):
        if CUT_SHORT.wait(0.5):
            raise CutShort


@dataclass(frozen=True)
class Names:
    token: str  # in every business id of the run
    database: str
    queue: str


def configure(seed: int) -> Names:
    """Point tests.settings at the run's own database, queue and Redis database."""
    pid = os.getpid()
    names = Names(token=f"s{seed}p{pid}", database=f"rt_chaos_{pid}", queue=f"rt-chaos-{pid}")
    os.environ.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        PYTHONPATH=str(ROOT),
        RT_TEST_DB="postgres",
        RT_TEST_DB_NAME=names.database,
        RT_TEST_QUEUE=names.queue,
        RT_TEST_REDIS_URL=REDIS_URL,
        # Batches small enough that a killed relay dies with rows in flight.
        RT_TEST_RELAY_BATCH_SIZE="100",
        RT_TEST_MAX_DELIVERIES="5",
    )
    for inherited in ("RT_TEST_RELAY_IN_WORKER", "RT_TEST_SENTRY_ENVELOPES", "RT_TEST_SIGNAL_DIR"):
        os.environ.pop(inherited, None)
    return names


# --------------------------------------------------------------------------------------------
# The database


def _admin_connection() -> Any:
    import psycopg

    return psycopg.connect(
        host=os.environ.get("PGHOST", "127.0.0.1"),
        port=os.environ.get("PGPORT", "5432"),
        user=os.environ.get("PGUSER", "postgres"),
        dbname="postgres",
        autocommit=True,
    )


def create_database(name: str) -> None:
    from django.core.management import call_command

    with _admin_connection() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    call_command("migrate", run_syncdb=True, verbosity=0)


def drop_database(name: str) -> None:
    from django.db import connections

    connections.close_all()
    with _admin_connection() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def restore_services(grace: float = 60.0) -> None:
    """Whatever happened, RabbitMQ and Redis run when the suite ends.

    A service that is down may be in another run's outage: it gets ``grace`` seconds to come
    back before it is started here.
    """
    deadline = time.monotonic() + grace
    while not (port_open(5672) and redis_up()) and time.monotonic() < deadline:
        time.sleep(1)
    with service_lock():
        if not redis_up():
            redis_start()
        if not port_open(5672):
            rabbitmq_start()


def delete_queue(name: str) -> None:
    from kombu import Connection

    with Connection(BROKER_URL, connect_timeout=5) as conn:
        conn.default_channel.queue_delete(name)


# --------------------------------------------------------------------------------------------
# Enqueueing


class _RollBack(Exception):
    """Raised to roll back a transaction after its delay() call."""


def enqueue(item: plan.Enqueue) -> str:
    """One delay() call of a logical task; returns the task id."""
    from tests.testapp import tasks

    t = item.task
    calls: dict[str, Callable[[], Any]] = {
        plan.RECORD: lambda: tasks.chaos_record.delay(t.effect_key),
        plan.ROLLED_BACK: lambda: tasks.chaos_record.delay(t.effect_key),
        plan.ORDER: lambda: tasks.chaos_order.delay(t.ident),
        plan.FLAKY: lambda: tasks.chaos_flaky.delay(t.effect_key),
        plan.CHARGE: lambda: tasks.chaos_charge.delay(
            t.ident, t.amount, lose_response=t.lose_response
        ),
        plan.DECLINED: lambda: tasks.chaos_declined.delay(t.effect_key),
        plan.CRASH: lambda: tasks.chaos_crash.delay(t.effect_key),
    }
    return str(calls[t.kind]().id)


class Producer(threading.Thread):
    """Enqueues the workload in small transactions, spread evenly over ``seconds``."""

    def __init__(self, workload: plan.Workload, seconds: float, t0: float) -> None:
        super().__init__(name="chaos-producer")
        self.workload = workload
        self.seconds = seconds
        self.t0 = t0
        self.rolled_back_ids: list[str] = []
        self.calls = 0
        self.finished_at: float | None = None
        self.error: str | None = None
        self.stop = threading.Event()  # set when the run is cut short

    def run(self) -> None:
        from django.db import connections, transaction

        items = self.workload.enqueues
        chunks = [
            items[i : i + ENQUEUES_PER_TRANSACTION]
            for i in range(0, len(items), ENQUEUES_PER_TRANSACTION)
        ]
        pace = self.seconds / max(1, len(chunks))
        try:
            for n, chunk in enumerate(chunks):
                if self.stop.wait(max(0.0, self.t0 + n * pace - time.monotonic())):
                    break
                with transaction.atomic():
                    for item in chunk:
                        if item.task.kind != plan.ROLLED_BACK:
                            enqueue(item)
                            self.calls += 1
                for item in chunk:
                    if item.task.kind == plan.ROLLED_BACK:
                        try:
                            with transaction.atomic():
                                self.rolled_back_ids.append(enqueue(item))
                                self.calls += 1
                                raise _RollBack
                        except _RollBack:
                            pass
        except Exception:  # noqa: BLE001 - reported as a failed check, with the traceback
            self.error = traceback.format_exc()
        finally:
            self.finished_at = time.monotonic()
            connections.close_all()


# --------------------------------------------------------------------------------------------
# Faults


class Injector(threading.Thread):
    """Injects the scheduled faults at their times; outages run in threads of their own."""

    def __init__(self, faults: list[plan.Fault], fleet: Fleet, t0: float, seed: int) -> None:
        super().__init__(name="chaos-injector")
        self.faults = faults
        self.fleet = fleet
        self.t0 = t0
        self.injected: Counter[str] = Counter()
        self.duplicates_sent = 0
        self.errors: list[str] = []
        self.finished_at: float | None = None
        self._rng = random.Random(f"duplicates:{seed}")
        self._lock = threading.Lock()
        self.stop = threading.Event()  # set when the run is cut short

    def say(self, text: str) -> None:
        print(f"  t+{time.monotonic() - self.t0:6.1f} s  {text}", flush=True)

    def run(self) -> None:
        from django.db import connections

        outages: list[threading.Thread] = []
        try:
            for fault in self.faults:
                if self.stop.wait(max(0.0, self.t0 + fault.at - time.monotonic())):
                    break
                if fault.kind in (plan.RESTART_RABBITMQ, plan.STOP_REDIS):
                    thread = threading.Thread(target=self._inject, args=(fault,))
                    thread.start()
                    outages.append(thread)
                else:
                    self._inject(fault)
            for thread in outages:
                thread.join()
        finally:
            self.finished_at = time.monotonic()
            connections.close_all()

    def _inject(self, fault: plan.Fault) -> None:
        handlers: dict[str, Callable[[plan.Fault], None]] = {
            plan.KILL_WORKER: lambda f: self.fleet.kill_worker(f.target),
            plan.KILL_RELAY: lambda f: self.fleet.kill_relay(f.target),
            plan.RESTART_RABBITMQ: self._restart_rabbitmq,
            plan.STOP_REDIS: self._stop_redis,
            plan.DUPLICATES: self._duplicates,
        }
        try:
            if fault.kind in (plan.KILL_WORKER, plan.KILL_RELAY):
                self.say(fault.describe())
            handlers[fault.kind](fault)
        except Exception:  # noqa: BLE001 - a fault that could not be injected fails the run
            self.errors.append(f"{fault.describe()}: {traceback.format_exc()}")
            self.say(f"FAILED to inject: {fault.describe()}")
        else:
            with self._lock:
                self.injected[fault.kind] += 1

    def _restart_rabbitmq(self, fault: plan.Fault) -> None:
        with service_lock() as waited:
            note = f" (after {waited:.1f} s waiting for the lock)" if waited > 0.5 else ""
            self.say(f"RabbitMQ stop_app{note}")
            try:
                rabbitmqctl("stop_app")
                self.say("RabbitMQ stopped")
                time.sleep(fault.duration)
            finally:
                rabbitmq_start()
                self.say("RabbitMQ started again")

    def _stop_redis(self, fault: plan.Fault) -> None:
        with service_lock() as waited:
            note = f" (after {waited:.1f} s waiting for the lock)" if waited > 0.5 else ""
            self.say(f"Redis shutdown nosave{note}")
            try:
                redis_stop()
                time.sleep(fault.duration)
            finally:
                redis_start()
                self.say("Redis started again")

    def _duplicates(self, fault: plan.Fault) -> None:
        """Publish again, raw, the messages of tasks whose key is done: same id, same body."""
        from django.db.models import Min
        from kombu import Connection, Producer

        from reliable_tasks.models import IdempotencyKey, OutboxMessage
        from tests.testapp import tasks

        names = [t.name for t in (tasks.chaos_record, tasks.chaos_order, tasks.chaos_flaky, tasks.chaos_charge)]  # fmt: skip
        done = sorted(
            IdempotencyKey.objects.filter(state="done", task_name__in=names).values_list(
                "task_id", flat=True
            )
        )
        chosen = self._rng.sample(done, min(fault.target, len(done)))
        first_rows = (
            OutboxMessage.objects.filter(task_id__in=chosen)
            .values("task_id")
            .annotate(first=Min("id"))
            .values_list("first", flat=True)
        )
        rows = list(OutboxMessage.objects.filter(id__in=list(first_rows)))
        deadline = time.monotonic() + 60
        while True:
            try:
                with Connection(BROKER_URL, transport_options={"confirm_publish": True}) as conn:
                    producer = Producer(conn.default_channel, auto_declare=False)
                    for row in rows:
                        properties = {**row.properties, "delivery_mode": 2}
                        producer.publish(
                            row.body, exchange=row.exchange, routing_key=row.routing_key,
                            headers=row.headers, content_type=row.content_type,
                            content_encoding=row.content_encoding, **properties,
                        )  # fmt: skip
                break
            except Exception:  # kombu wraps a refused connection in errors of its own
                # The broker is down (an outage in progress): the whole burst goes again later.
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        self.duplicates_sent += len(rows)
        self.say(f"published raw duplicates of {len(rows)} messages that already ran")


# --------------------------------------------------------------------------------------------
# Draining and checking


@dataclass
class Progress:
    effects: int
    charges: int
    pending: int
    dead: int

    def describe(self, expected: Progress) -> str:
        return (
            f"effects {self.effects}/{expected.effects}, charges {self.charges}/{expected.charges}, "
            f"dead {self.dead}/{expected.dead}, outbox pending {self.pending}"
        )


def progress() -> Progress:
    from reliable_tasks.models import DeadTask, OutboxMessage
    from tests.testapp.models import Effect, GatewayCharge

    return Progress(
        effects=Effect.objects.filter(key__startswith="chaos:").values("key").distinct().count(),
        charges=GatewayCharge.objects.values("order").distinct().count(),
        pending=OutboxMessage.objects.filter(status="pending").count(),
        dead=DeadTask.objects.count(),
    )


def expected_progress(workload: plan.Workload) -> Progress:
    kinds = workload.by_kind()
    return Progress(
        effects=kinds[plan.RECORD] + kinds[plan.ORDER] + kinds[plan.FLAKY],
        charges=kinds[plan.CHARGE],
        pending=0,
        dead=kinds[plan.DECLINED] + kinds[plan.CRASH],
    )


def wait_drained(queue: str, expected: Progress, timeout: float, t0: float) -> float | None:
    """Until every effect and dead task is there, the outbox and the queue empty; when, or None."""
    deadline = time.monotonic() + timeout
    next_note = 0.0
    while time.monotonic() < deadline:
        now = progress()
        if time.monotonic() >= next_note:
            print(f"  t+{time.monotonic() - t0:6.1f} s  {now.describe(expected)}", flush=True)
            next_note = time.monotonic() + 10
        if (
            now.effects >= expected.effects
            and now.charges >= expected.charges
            and now.dead >= expected.dead
            and now.pending == 0
            and queue_counts(queue) == (0, 0)
        ):
            return time.monotonic()
        if CUT_SHORT.wait(1):
            raise CutShort
    return None


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Findings:
    checks: list[Check]
    counts: dict[str, Any]
    suspects: list[str]  # business ids of tasks worth a look when a check failed


def verify(
    workload: plan.Workload,
    names: Names,
    producer: Producer,
    injector: Injector,
    fleet: Fleet,
    drained: bool,
    drain_timeout: float,
) -> Findings:
    from django.db.models import Count
    from django.utils import timezone

    from reliable_tasks import metrics
    from reliable_tasks.models import DeadTask, IdempotencyKey, OutboxMessage, TaskAttempt
    from tests.testapp.models import Effect, GatewayCharge, GatewayRequest, Observed

    effects = Counter(Effect.objects.filter(key__startswith="chaos:").values_list("key", flat=True))
    charges = Counter(GatewayCharge.objects.values_list("order", flat=True))
    lost: list[plan.LogicalTask] = []
    doubled: list[tuple[plan.LogicalTask, int]] = []
    ran_anyway: list[plan.LogicalTask] = []
    for t in workload.tasks:
        n = charges[t.ident] if t.kind == plan.CHARGE else effects[t.effect_key]
        if t.expects_effect and n == 0:
            lost.append(t)
        elif n > 1:
            doubled.append((t, n))
        elif not t.expects_effect and n:
            ran_anyway.append(t)

    dead_rows = list(DeadTask.objects.values_list("task_name", "args", "reason", "task_id"))
    dead_by_arg: dict[str, list[str]] = {}
    for _name, args, reason, _task_id in dead_rows:
        if args:
            dead_by_arg.setdefault(str(args[0]), []).append(reason)
    poison = [t for t in workload.tasks if t.kind in plan.POISON_REASONS]
    wrong_dead = [
        f"{t.kind} {t.ident}: {dead_by_arg.get(t.effect_key, [])}"
        for t in poison
        if dead_by_arg.get(t.effect_key) != [plan.POISON_REASONS[t.kind]]
    ]
    poison_keys = {t.effect_key for t in poison}
    unexpected_dead = [
        f"{reason} {name} {args} {task_id}"
        for name, args, reason, task_id in dead_rows
        if not args or str(args[0]) not in poison_keys
    ]

    pending = OutboxMessage.objects.filter(status="pending").count()
    rolled_back_rows = OutboxMessage.objects.filter(task_id__in=producer.rolled_back_ids).count()
    live_leases = IdempotencyKey.objects.filter(
        state="running", lease_expires_at__gt=timezone.now()
    ).count()
    running_keys = IdempotencyKey.objects.filter(state="running").count()
    counts_in_queue = queue_counts(names.queue)
    for _ in range(30):
        if counts_in_queue is not None:
            break
        time.sleep(2)  # RabbitMQ is down: another run's outage, most likely
        counts_in_queue = queue_counts(names.queue)
    exited = fleet.exited()

    def duplicate_answers() -> int:
        # Deliveries that found their key done and ran nothing (a raw duplicate is one).
        return Observed.objects.filter(kind="duplicate").count()

    def listing(items: list[Any]) -> str:
        shown = ", ".join(map(str, items[:5]))
        return f"{len(items)}: {shown}{' ...' if len(items) > 5 else ''}" if items else ""

    checks = [
        Check(f"drained within {drain_timeout:.0f} s of the last enqueue and fault", drained, "timed out: the failures below may be work still under way"),
        Check("every task enqueued (no producer error)", producer.error is None, producer.error or ""),
        Check("every planned fault injected", not injector.errors, "; ".join(injector.errors)[:2000]),
        Check("no task lost (each effect at least once)", not lost, listing([f"{t.kind} {t.ident}" for t in lost])),
        Check("no task run twice (each effect at most once)", not doubled, listing([f"{t.kind} {t.ident} x{n}" for t, n in doubled])),
        Check("rolled-back enqueues never ran, left no outbox row", not ran_anyway and not rolled_back_rows, f"effects {listing(ran_anyway)}, rows {rolled_back_rows}"),
        Check("every poison task dead once, with its reason", not wrong_dead, listing(wrong_dead)),
        Check("no other task dead", not unexpected_dead, listing(unexpected_dead)),
        Check("outbox drained (no pending row)", pending == 0, f"{pending} pending"),
        Check("queue drained (nothing ready or unacknowledged)", counts_in_queue == (0, 0), f"{counts_in_queue}"),
        Check("no lease left held (no running key with a live lease)", live_leases == 0, f"{live_leases} live"),
        Check("relays and workers still running", not exited, ", ".join(exited)),
        Check("raw duplicates sent, each answered without running", 0 < injector.duplicates_sent <= duplicate_answers(), f"{injector.duplicates_sent} sent, {duplicate_answers()} answered"),
    ]  # fmt: skip

    snap = metrics.snapshot()
    attempts = Counter(TaskAttempt.objects.values_list("outcome", flat=True))
    observed = Counter(Observed.objects.values_list("kind", flat=True))
    dead_reasons = dict(DeadTask.objects.values_list("reason").annotate(n=Count("id")).order_by())
    counts: dict[str, Any] = {
        "outbox_rows": OutboxMessage.objects.count(),
        "retry_rows": OutboxMessage.objects.filter(retries__gt=0).count(),
        "effects": sum(effects.values()),
        "charges": sum(charges.values()),
        "duplicate_hits": observed["duplicate"],
        "deferrals": observed["deferred"],
        "gateway_replays": GatewayRequest.objects.filter(replayed=True).count(),
        "failed_attempts": attempts["failed"],
        "lost_deliveries": attempts["lost"],
        "dead": dead_reasons,
        "lost": len(lost),
        "doubled": sum(n - 1 for _, n in doubled),
        "running_keys": running_keys,
        "metrics": snap.counters,
    }
    suspects = [t.ident for t in lost[:3]] + [t.ident for t, _ in doubled[:3]]
    return Findings(checks, counts, suspects)


def diagnose(idents: list[str], fleet: Fleet) -> None:
    """What the database and the process logs say about a few tasks that failed a check."""
    from reliable_tasks.models import DeadTask, IdempotencyKey, OutboxMessage, TaskAttempt

    for ident in idents:
        # The business id closes a JSON string in the body: "...s1p2-7" (not s1p2-70).
        rows = list(
            OutboxMessage.objects.filter(body__contains=f'{ident}"').values_list(
                "id", "task_id", "task_name", "status", "retries", "publish_attempts", "due_at"
            )[:10]
        )
        print(f"\n  task {ident}: outbox rows {rows}")
        task_ids = {r[1] for r in rows}
        for key in IdempotencyKey.objects.filter(task_id__in=task_ids).values():
            print(f"    ledger: {key}")
        for attempt in TaskAttempt.objects.filter(task_id__in=task_ids).values(
            "task_id", "number", "outcome", "exc_type", "message", "worker"
        ):
            print(f"    attempt: {attempt}")
        for dead in DeadTask.objects.filter(task_id__in=task_ids).values("reason", "exc_message"):
            print(f"    dead: {dead}")
        for log in sorted(fleet.logdir.glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if any(task_id in line for task_id in task_ids):
                    print(f"    {log.name}: {line[:300]}")


# --------------------------------------------------------------------------------------------
# The table


def table(
    profile: plan.Profile,
    seed: int,
    workload: plan.Workload,
    faults: list[plan.Fault],
    injector: Injector,
    findings: Findings,
    times: dict[str, float | None],
) -> str:
    c = findings.counts
    planned = Counter(f.kind for f in faults)
    labels = {
        plan.KILL_WORKER: "worker SIGKILLed (replaced)",
        plan.KILL_RELAY: "relay SIGKILLed (restarted)",
        plan.RESTART_RABBITMQ: "RabbitMQ restarted",
        plan.STOP_REDIS: f"Redis stopped {profile.redis_down:.0f} s",
        plan.DUPLICATES: "raw duplicate bursts",
    }
    kinds = workload.by_kind()
    dead = ", ".join(f"{reason} {n}" for reason, n in sorted(c["dead"].items())) or "none"
    metric = c["metrics"]
    lines = [
        f"chaos run: {profile.name}, seed {seed} (replay: python -m tests.chaos --seed {seed}"
        f"{'' if profile.name == 'full' else ' --small'}{'' if profile.tasks == plan.PROFILES[profile.name].tasks else f' --tasks {profile.tasks}'})",
        "",
        "faults injected                     done / planned",
        *(
            f"  {labels[kind]:<32} {injector.injected[kind]:>5} / {planned[kind]}"
            for kind in plan.FAULT_KINDS
        ),
        f"  {'raw duplicate messages sent':<32} {injector.duplicates_sent:>5}",
        "",
        "tasks",
        f"  {'tasks (logical)':<32} {len(workload.tasks):>7}",
        f"  {'delay() calls':<32} {len(workload.enqueues):>7}   ({kinds[plan.ROLLED_BACK]} rolled back)",
        f"  {'outbox rows (retries included)':<32} {c['outbox_rows']:>7}",
        f"  {'effects':<32} {c['effects'] + c['charges']:>7}   ({c['effects']} rows, {c['charges']} gateway charges)",
        f"  {'duplicates prevented':<32} {c['duplicate_hits'] + c['gateway_replays']:>7}   "
        f"({c['duplicate_hits']} by the ledger, {c['gateway_replays']} by the gateway's key; "
        f"{c['deferrals']} deferred on a live lease)",
        f"  {'retries':<32} {c['retry_rows']:>7}   ({c['failed_attempts']} failed attempts, {c['lost_deliveries']} lost deliveries recorded)",
        f"  {'dead':<32} {sum(c['dead'].values()):>7}   ({dead})",
        f"  {'lost':<32} {c['lost']:>7}",
        f"  {'run twice':<32} {c['doubled']:>7}",
        f"  {'time to drain':<32} {_seconds(times['drain']):>7}   (after the last enqueue and the last fault)",
        f"  {'whole run':<32} {_seconds(times['total']):>7}   (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)",
        f"  {'metrics counters (Redis)':<32} duplicate_hits {metric.get('duplicate_hits', 0)}, "
        f"deferrals {metric.get('deferrals', 0)}, retries {metric.get('retries', 0)}, "
        f"dead_tasks {metric.get('dead_tasks', 0)} (best effort: the Redis outage resets them)",
        "",
        "checks",
        *(
            f"  {'PASS' if check.ok else 'FAIL'}  {check.name}"
            + ("" if check.ok or not check.detail else f"\n        {check.detail}")
            for check in findings.checks
        ),
    ]  # fmt: skip
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


# --------------------------------------------------------------------------------------------
# The run


def main(profile: plan.Profile, seed: int, names: Names, keep: bool = False) -> int:
    """Run the chaos suite; 0 if every check passed."""
    import django

    django.setup()
    started = time.monotonic()
    workload = plan.workload(profile, seed, names.token)
    faults = plan.schedule(profile, seed)
    print(
        f"chaos run {profile.name}: seed {seed}, {profile.relays} relays, {profile.workers} workers "
        f"({profile.concurrency} pool processes each); "
        f"database {names.database}, queue {names.queue}"
    )
    print(f"workload: {workload.describe()}, over {profile.enqueue_seconds:.0f} s")
    print("fault schedule (seconds after the start):")
    for fault in faults:
        print(f"  t+{fault.at:6.1f} s  {fault.describe()}")
    print(flush=True)

    if not (port_open(5432) and port_open(5672) and redis_up()):
        ensure_services()
    create_database(names.database)
    logdir = Path(tempfile.mkdtemp(prefix=f"rt-chaos-{seed}-"))
    env = {**os.environ}
    fleet = Fleet(env=env, logdir=logdir, queue=names.queue, concurrency=profile.concurrency)
    ok = False
    producer: Producer | None = None
    injector: Injector | None = None
    try:
        for slot in range(profile.relays):
            fleet.start_relay(slot)
        for slot in range(profile.workers):
            fleet.start_worker(slot)
        fleet.wait_ready(stop=CUT_SHORT)
        if CUT_SHORT.is_set():
            raise CutShort
        print(f"processes ready after {time.monotonic() - started:.1f} s; logs in {logdir}")
        t0 = time.monotonic()
        producer = Producer(workload, profile.enqueue_seconds, t0)
        injector = Injector(faults, fleet, t0, seed)
        producer.start()
        injector.start()
        _wait_for(producer)
        print(
            f"  t+{time.monotonic() - t0:6.1f} s  all {producer.calls} delay() calls made",
            flush=True,
        )
        _wait_for(injector)
        print(f"  t+{time.monotonic() - t0:6.1f} s  all faults injected; draining", flush=True)
        quiet_since = max(producer.finished_at or t0, injector.finished_at or t0)
        drained_at = wait_drained(
            names.queue, expected_progress(workload), profile.drain_timeout, t0
        )
        findings = verify(
            workload,
            names,
            producer,
            injector,
            fleet,
            drained_at is not None,
            profile.drain_timeout,
        )
        times = {
            "drain": None if drained_at is None else max(0.0, drained_at - quiet_since),
            "total": time.monotonic() - started,
        }
        findings.checks.append(
            Check(
                f"whole run within {profile.time_budget:.0f} s",
                times["total"] <= profile.time_budget,
                f"took {times['total']:.0f} s",
            )
        )
        print()
        print(table(profile, seed, workload, faults, injector, findings, times))
        ok = all(check.ok for check in findings.checks)
        if not ok:
            diagnose(findings.suspects, fleet)
            print(f"\nFAILED: seed {seed}; process logs kept in {logdir}")
    except CutShort:
        print("cut short: stopping the processes, restoring the services, dropping the database")
    finally:
        # No new enqueue or fault; an outage in progress ends (its service restarts) first.
        for thread in (producer, injector):
            if thread is not None and thread.is_alive():
                thread.stop.set()
                thread.join()
        fleet.stop_all()
        restore_services()
        try:
            delete_queue(names.queue)
        except Exception as exc:  # noqa: BLE001 - a queue left behind is named after the run
            print(f"could not delete queue {names.queue}: {exc!r}")
        if not keep:
            drop_database(names.database)
        if ok and not keep:
            shutil.rmtree(logdir, ignore_errors=True)
    return 0 if ok else 1
