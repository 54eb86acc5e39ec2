"""What a chaos run does, drawn from its seed: the tasks it enqueues and the faults it injects.

Nothing here touches a database, a broker or a process, so the same seed always prints the
same plan. (Which tasks are already done when a raw duplicate is sent depends on timing; the
choice among them is still made by the seeded generator.)
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

# Kinds of logical task (see tests/testapp/tasks.py, "the chaos suite").
RECORD = "record"  # atomic, keyed by the task id
ORDER = "order"  # atomic, keyed by the order; enqueued twice
FLAKY = "flaky"  # atomic; writes, then fails its first attempt; the retry succeeds
CHARGE = "charge"  # lease mode against the fake gateway; some enqueued twice, some lose a reply
DECLINED = "declined"  # poison: a give-up exception
CRASH = "crash"  # poison: kills its worker every time
ROLLED_BACK = "rolled_back"  # enqueued in a transaction that rolls back: must never run

POISON_REASONS = {DECLINED: "give_up", CRASH: "crash_loop"}

# Kinds of fault.
KILL_WORKER = "kill_worker"
KILL_RELAY = "kill_relay"
RESTART_RABBITMQ = "restart_rabbitmq"
STOP_REDIS = "stop_redis"
DUPLICATES = "duplicates"
FAULT_KINDS = (KILL_WORKER, KILL_RELAY, RESTART_RABBITMQ, STOP_REDIS, DUPLICATES)


@dataclass(frozen=True)
class Profile:
    """The size of a run and how hard its faults hit."""

    name: str
    tasks: int
    poison_each: int  # tasks of each poison kind
    workers: int
    concurrency: int  # pool processes per worker
    relays: int
    enqueue_seconds: float  # the producer spreads its transactions over this long
    fault_window: float  # faults start in [first_fault, fault_window] seconds
    first_fault: float
    worker_kill_every: tuple[float, float]
    relay_kills: int
    rabbitmq_restarts: int
    rabbitmq_down: float  # seconds between stop_app and start_app
    redis_down: float
    duplicate_bursts: int
    duplicates_per_burst: int
    drain_timeout: float  # after the last enqueue and the last fault
    time_budget: float  # the whole run, from start to the checks

    @property
    def kill_mean(self) -> float:
        return sum(self.worker_kill_every) / 2


FULL = Profile(
    name="full", tasks=10_000, poison_each=5, workers=3, concurrency=2, relays=2, enqueue_seconds=120.0,
    fault_window=150.0, first_fault=3.0, worker_kill_every=(4.0, 8.0), relay_kills=2,
    rabbitmq_restarts=2, rabbitmq_down=5.0, redis_down=20.0, duplicate_bursts=5,
    duplicates_per_burst=60, drain_timeout=380.0, time_budget=600.0,
)  # fmt: skip
SMALL = Profile(
    name="small", tasks=600, poison_each=2, workers=3, concurrency=2, relays=2, enqueue_seconds=12.0,
    fault_window=28.0, first_fault=2.0, worker_kill_every=(3.0, 6.0), relay_kills=1,
    rabbitmq_restarts=2, rabbitmq_down=1.0, redis_down=5.0, duplicate_bursts=3,
    duplicates_per_burst=20, drain_timeout=60.0, time_budget=120.0,
)  # fmt: skip
PROFILES = {p.name: p for p in (FULL, SMALL)}


@dataclass(frozen=True)
class LogicalTask:
    """One unit of work whose effect must happen exactly once (or never, for some kinds)."""

    kind: str
    ident: str  # the business id; it carries the run's token
    enqueues: int = 1
    lose_response: bool = False  # CHARGE only: the gateway charges, the reply is lost

    @property
    def effect_key(self) -> str:
        """The Effect row's key (every kind but CHARGE, whose effect is a gateway charge)."""
        return f"chaos:{self.kind}:{self.ident}"

    @property
    def expects_effect(self) -> bool:
        return self.kind in (RECORD, ORDER, FLAKY, CHARGE)

    @property
    def amount(self) -> int:
        return 100 + int(self.ident.rpartition("-")[2]) % 900


@dataclass(frozen=True)
class Enqueue:
    """One ``delay()`` call of a logical task."""

    task: LogicalTask
    copy: int  # 0 for the first enqueue, 1 for the second of a twice-enqueued task


@dataclass(frozen=True)
class Workload:
    tasks: list[LogicalTask]
    enqueues: list[Enqueue]  # in the order the producer makes them

    def by_kind(self) -> Counter[str]:
        return Counter(t.kind for t in self.tasks)

    def describe(self) -> str:
        kinds = self.by_kind()
        twice = sum(1 for t in self.tasks if t.enqueues == 2)
        parts = [f"{kinds[k]} {k}" for k in (RECORD, ORDER, FLAKY, CHARGE, DECLINED, CRASH)]
        return (
            f"{len(self.tasks)} tasks ({', '.join(parts)}, {kinds[ROLLED_BACK]} rolled back); "
            f"{twice} enqueued twice; {len(self.enqueues)} delay() calls"
        )


def workload(profile: Profile, seed: int, run: str) -> Workload:
    """The logical tasks of a run and the order of their enqueues."""
    rng = random.Random(f"workload:{seed}")
    n = profile.tasks
    poison = profile.poison_each
    rest = n - 2 * poison
    counts = {
        ORDER: rest // 10,
        CHARGE: rest // 10,
        FLAKY: rest // 20,
        ROLLED_BACK: max(1, rest // 100),
    }
    counts[RECORD] = rest - sum(counts.values())
    counts[DECLINED] = counts[CRASH] = poison
    tasks: list[LogicalTask] = []
    serial = 0
    for kind in (RECORD, ORDER, FLAKY, CHARGE, DECLINED, CRASH, ROLLED_BACK):
        for _ in range(counts[kind]):
            serial += 1
            ident = f"{run}-{serial}"
            if kind == ORDER:
                tasks.append(LogicalTask(kind, ident, enqueues=2))
            elif kind == CHARGE:
                tasks.append(
                    LogicalTask(
                        kind,
                        ident,
                        enqueues=2 if rng.random() < 0.3 else 1,
                        lose_response=rng.random() < 0.2,
                    )
                )
            else:
                tasks.append(LogicalTask(kind, ident))
    enqueues = [Enqueue(t, copy) for t in tasks for copy in range(t.enqueues)]
    rng.shuffle(enqueues)
    return Workload(tasks, enqueues)


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the run's start
    kind: str
    target: int = 0  # the worker or relay slot; the burst size for DUPLICATES
    duration: float = 0.0  # RESTART_RABBITMQ and STOP_REDIS: how long the service stays down

    def describe(self) -> str:
        if self.kind == KILL_WORKER:
            return f"SIGKILL worker {self.target} (and start a replacement)"
        if self.kind == KILL_RELAY:
            return f"SIGKILL relay {self.target} (and restart it)"
        if self.kind == RESTART_RABBITMQ:
            return f"RabbitMQ stop_app, {self.duration:.0f} s down, start_app"
        if self.kind == STOP_REDIS:
            return f"Redis shutdown nosave, {self.duration:.0f} s down, start again"
        return f"publish raw duplicates of {self.target} messages that already ran"


def schedule(profile: Profile, seed: int) -> list[Fault]:
    """The faults of a run, in time order."""
    rng = random.Random(f"faults:{seed}")
    start, end = profile.first_fault, profile.fault_window
    faults: list[Fault] = []
    at = start
    while True:
        at += rng.uniform(*profile.worker_kill_every)
        if at > end:
            break
        faults.append(Fault(round(at, 1), KILL_WORKER, target=rng.randrange(profile.workers)))
    faults += [
        Fault(round(rng.uniform(start, end), 1), KILL_RELAY, target=rng.randrange(profile.relays))
        for _ in range(profile.relay_kills)
    ]
    # The outages get one slot each, in a shuffled order, so that they do not overlap.
    outages = [(RESTART_RABBITMQ, profile.rabbitmq_down)] * profile.rabbitmq_restarts
    outages.append((STOP_REDIS, profile.redis_down))
    rng.shuffle(outages)
    slot = (end - start) / len(outages)
    for i, (kind, duration) in enumerate(outages):
        latest = max(0.0, slot - duration - 2.0)
        faults.append(Fault(round(start + i * slot + rng.uniform(0, latest), 1), kind, 0, duration))
    faults += [
        Fault(round(rng.uniform(start + 0.2 * (end - start), end), 1), DUPLICATES, target=size)
        for size in [profile.duplicates_per_burst] * profile.duplicate_bursts
    ]
    return sorted(faults, key=lambda f: f.at)
