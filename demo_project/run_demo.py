"""The reliable_tasks demo: a shop that charges cards and sends receipts in the background,
while the demo kills a worker and stops the broker under it.

Run it with ``make demo``. It

1. migrates the demo database: SQLite in the state folder (``.demo/``, or ``DEMO_STATE_DIR``),
   fresh on every run, or the PostgreSQL named by ``DATABASE_URL``;
2. picks the broker: ``CELERY_BROKER_URL`` if set, else the RabbitMQ on 127.0.0.1:5672, else
   (with a notice) kombu's embedded ``filesystem://`` transport; ``DEMO_BROKER=embedded`` takes
   the fallback even when RabbitMQ is up. And the cache the processes share for metrics:
   ``DEMO_CACHE_URL``, else the Redis on 127.0.0.1:6379, else files in the state folder;
3. starts a relay and two Celery workers (prefork, two processes each), their logs in the
   state folder;
4. places orders (``DEMO_ORDERS``, 300), each committing the order with
   ``charge_payment.delay()`` and ``send_receipt.delay()``; one in a hundred is for the poison
   product, whose receipt kills the worker process that renders it. Meanwhile, on RabbitMQ,
   it SIGKILLs a worker and starts another, and stops the broker for 5 s (only a RabbitMQ on
   this machine, holding /tmp/rt-rabbitmq.lock so that other chaos runs wait);
5. waits until every order is charged and has its receipt or a dead task (``DEMO_TIMEOUT``,
   120 s), then reports from the database; the run fails if an order is lost or doubled;
6. leaves the admin running (``runserver`` on 127.0.0.1:8000 or ``DEMO_PORT``, or a free port)
   with a new superuser, so that the dead tasks can be inspected and requeued, until Ctrl-C.
   Not when ``DEMO_NO_ADMIN=1``, ``CI`` is set, or stdin is no terminal: then it just ends;
   ``DEMO_ADMIN=1`` asks for the admin all the same (without a terminal it then runs until
   SIGINT or SIGTERM), as the test of the admin and of Ctrl-C does in CI;
7. stops the admin, the relay and the workers with SIGTERM (SIGKILL if one will not stop).

It exits 0 when nothing was lost or doubled, 1 otherwise, 130 when interrupted early.
``DEMO_SEED`` (42) seeds the orders and the payment gateway's timeouts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

PROJECT_DIR = Path(__file__).resolve().parent
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
REDIS_URL = "redis://127.0.0.1:6379/0"
ORDERS = int(os.environ.get("DEMO_ORDERS", "300"))
SEED = int(os.environ.get("DEMO_SEED", "42"))
TIMEOUT = float(os.environ.get("DEMO_TIMEOUT", "120"))
ADMIN_PORT = int(os.environ.get("DEMO_PORT", "8000"))
# Orders arrive at about this rate, so that the faults fall in the middle of the traffic.
ORDERS_PER_SECOND = 15.0
OUTAGE_SECONDS = 5.0
STOP_TIMEOUT = 40.0
RABBITMQ_LOCK = Path("/tmp/rt-rabbitmq.lock")
LOCK_WAIT = 60.0
CUSTOMERS = ("Ada", "Grace", "Alan", "Barbara", "Edsger", "Margaret", "Donald", "Frances")
PRODUCTS = (
    ("Espresso beans (1 kg)", "24.00"),
    ("Ceramic mug", "12.50"),
    ("Pour-over kettle", "49.90"),
    ("Paper filters (100)", "6.20"),
)
POISON = ("Haunted mug", "13.00")
POISON_EVERY = 100

_print_lock = threading.Lock()
_clock = time.monotonic()


@dataclass(frozen=True)
class Placed:
    """A committed order and the ids of its two tasks."""

    order_id: int
    charge_task: str
    receipt_task: str
    poison: bool
    at: float


@dataclass
class Service:
    """A process the demo started: the relay, a worker or the admin."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    killed: bool = False  # by the demo, on purpose


@dataclass
class Services:
    """Every process the demo started, so that none is left behind."""

    started: list[Service] = field(default_factory=list)
    workers: int = 0

    def start(self, name: str, *argv: str) -> Service:
        from django.conf import settings

        log = Path(settings.DEMO_DIR) / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, *argv],
                cwd=PROJECT_DIR,
                stdout=out,
                stderr=subprocess.STDOUT,
                # A process that will not stop is sent SIGABRT: the log then shows where it hung.
                env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                # A session of its own: Ctrl-C reaches only the demo, which then stops it with
                # SIGTERM; and the demo can kill a worker with its pool processes in one signal.
                start_new_session=True,
            )
        service = Service(name, process, log)
        self.started.append(service)
        return service

    def relay(self) -> Service:
        return self.start("relay", "manage.py", "reliable_tasks", "relay")

    def worker(self) -> Service:
        from django.conf import settings

        self.workers += 1
        return self.start(
            f"worker-{self.workers}",
            "-m", "celery", "-A", "demo", "worker", "--loglevel", "info",
            "--queues", settings.DEMO_QUEUE, "--pool", "prefork", "--concurrency", "2",
            # Fair: a message goes to a free pool process, never queued behind a busy one.
            "-O", "fair", "--prefetch-multiplier", "1",
            "--hostname", f"worker-{self.workers}.{os.getpid()}@%h",
            # Gossip, mingle and heartbeats coordinate workers through the broker; not needed here.
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        )  # fmt: skip

    def named(self, name: str) -> Service | None:
        return next((s for s in self.started if s.name == name), None)

    def running(self) -> list[Service]:
        return [s for s in self.started if not s.killed]

    def died(self) -> Service | None:
        """A process that exited although nobody asked it to."""
        return next((s for s in self.running() if s.process.poll() is not None), None)

    def stop_all(self) -> bool:
        """SIGTERM each process, wait, SIGKILL what will not stop. True if all stopped cleanly."""
        alive = [s for s in self.running() if s.process.poll() is None]
        for service in alive:
            service.process.send_signal(signal.SIGTERM)
        clean = True
        for service in self.running():
            try:
                code = service.process.wait(timeout=STOP_TIMEOUT)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                kill_stuck(service)
                clean = False
                continue
            # runserver does not catch SIGTERM: ending on it is its normal way to stop.
            ok = code == 0 or (service.name == "admin" and code == -signal.SIGTERM)
            clean = clean and ok and service in alive
            how = "stopped" if ok else f"exited with code {code}"
            say(f"{service.name:<9} {how}{last_words(service)}")
        for service in self.started:
            if service.killed:
                say(f"{service.name:<9} was killed by the demo (SIGKILL), on purpose")
        return clean


def kill_stuck(service: Service) -> None:
    """SIGABRT first: Python's faulthandler writes where every thread is stuck into the log."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(service.process.pid, signal.SIGABRT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        service.process.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(service.process.pid, signal.SIGKILL)
    service.process.wait()
    say(
        f"{service.name:<9} did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM: killed. Its log ends:"
    )
    show_tail(service.log, 30)


class Failed(Exception):
    """The demo cannot go on; the message says why."""


def main() -> int:
    # SIGTERM, or the terminal closing, stops the demo the way Ctrl-C does: its processes first.
    # SIGINT too when it was ignored at the start (a shell's background job without job
    # control): Python then leaves it ignored, and Ctrl-C or `kill -INT` would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    write(
        "reliable_tasks demo: a shop charges a card and sends a receipt for every order, in the\n"
        "background. Each order commits together with its two tasks (rows in the outbox table);\n"
        "a relay publishes committed rows to the broker; two Celery workers run them. Meanwhile\n"
        "the demo kills a worker and stops the broker. At the end every order must be charged\n"
        "exactly once and have exactly one receipt, or a dead task saying why not."
    )
    broker_url, broker_why = choose_broker()
    cache_url, cache_why = choose_cache()
    # Set before Django reads the settings; the relay, the workers and the admin inherit them.
    os.environ["CELERY_BROKER_URL"] = broker_url
    os.environ["DEMO_CACHE_URL"] = cache_url
    os.environ["DEMO_RUN_ID"] = uuid.uuid4().hex[:8]
    os.environ["DEMO_SEED"] = str(SEED)
    os.environ["DJANGO_SETTINGS_MODULE"] = "demo.settings"
    sys.path.insert(0, str(PROJECT_DIR))
    import django

    django.setup()

    services = Services()
    faults = Faults()
    code = 130
    try:
        step(1, "Database")
        fresh = migrate()
        products = stock_shop()
        step(2, "Broker and cache")
        describe_broker(broker_why)
        describe_cache(cache_why)
        if fresh:
            clear_broker()
        step(3, "A relay and two workers")
        start_services(services)
        step(4, f"Orders, and faults while they come in (seed {SEED})")
        placed = place_orders(ORDERS, products, services, faults)
        rolled_back = place_rolled_back_order(products)
        step(5, "Waiting until every order is charged and has its receipt (or a dead task)")
        wait_until_settled(placed, services)
        step(6, "Report, counted in the database")
        code = report(placed, rolled_back)
        admin, why_not = wants_admin()
        step(7, "The admin")
        if admin:
            run_admin(services)
        else:
            say(f"not started ({why_not}). Run `make demo` in a terminal to browse the")
            say("dead tasks and requeue them in Django's admin.")
    except KeyboardInterrupt:
        write("\nInterrupted.")
    except Failed as exc:
        say(f"FAILED: {exc}")
        code = 1
    finally:
        # On errors too: the demo leaves no process running and no broker stopped behind it.
        if faults.outage is not None and faults.outage.is_alive():
            say("waiting for RabbitMQ to be started again ...")
            faults.outage.join()
        names = "the admin, the relay" if services.named("admin") else "the relay"
        step(8, f"Stopping {names} and the workers with SIGTERM")
        if not services.stop_all() and code == 0:
            say("FAILED: a process did not stop cleanly on SIGTERM")
            code = 1
        forget_cache()
    write()
    if code == 0:
        write(
            "OK: every order was charged once and got one receipt, or its receipt is a dead task."
        )
    elif code == 1:
        write(f"FAILED. The logs are in {shown(demo_dir())}/.")
    return code


# --------------------------------------------------------------------------------------------
# 1. Database


def migrate() -> bool:
    """Migrate the demo database; return whether it is fresh (SQLite starts anew every run)."""
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection
    from reliable_tasks.models import OutboxMessage, OutboxStatus

    db = settings.DATABASES["default"]
    fresh: bool = db["ENGINE"] == "django.db.backends.sqlite3"
    if fresh:
        path = Path(db["NAME"])
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
    call_command("migrate", verbosity=0)
    if fresh:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode")
            (mode,) = cursor.fetchone()
        say(f"SQLite {shown(path)}, new for this run (journal_mode={mode})")
    else:
        say(f"PostgreSQL database {db['NAME']!r} on {db['HOST']}:{db['PORT']} (DATABASE_URL)")
        say("kept between runs; the report counts this run's orders only")
        waiting = OutboxMessage.objects.filter(status=OutboxStatus.PENDING).count()
        if waiting:
            say(f"{waiting} outbox rows of earlier runs are pending: the relay sends them too")
    say("migrated: reliable_tasks (outbox, ledger, dead tasks), shop, the payment gateway, admin")
    return fresh


def stock_shop() -> list[Any]:
    """The products, the poison one last."""
    from shop.models import Product

    products = []
    for (name, price), poison in [*((p, False) for p in PRODUCTS), (POISON, True)]:
        product, _ = Product.objects.update_or_create(
            name=name, defaults={"price": Decimal(price), "breaks_receipts": poison}
        )
        products.append(product)
    say(f"products: {', '.join(p.name for p in products[:-1])};")
    say(f"and the {POISON[0]}, whose receipt kills the worker process that renders it")
    return products


# --------------------------------------------------------------------------------------------
# 2. Broker and cache


def choose_broker() -> tuple[str, str]:
    """The broker URL, and why it was chosen."""
    url = os.environ.get("CELERY_BROKER_URL")
    if url:
        return url, "CELERY_BROKER_URL is set"
    mode = os.environ.get("DEMO_BROKER", "auto")
    if mode not in ("auto", "embedded"):
        sys.exit(f"DEMO_BROKER must be 'auto' (the default) or 'embedded', not {mode!r}.")
    if mode == "embedded":
        return "filesystem://", "DEMO_BROKER=embedded"
    problem = unreachable("127.0.0.1", 5672)
    if problem is None:
        return RABBITMQ_URL, "RabbitMQ answers on 127.0.0.1:5672"
    return "filesystem://", f"no RabbitMQ answers on 127.0.0.1:5672 ({problem})"


def choose_cache() -> tuple[str, str]:
    """The Redis URL of the shared cache ("" for files), and why."""
    if "DEMO_CACHE_URL" in os.environ:
        url = os.environ["DEMO_CACHE_URL"]
        return url, "DEMO_CACHE_URL is set"
    problem = unreachable("127.0.0.1", 6379)
    if problem is None:
        return REDIS_URL, "Redis answers on 127.0.0.1:6379"
    return "", f"no Redis answers on 127.0.0.1:6379 ({problem})"


def unreachable(host: str, port: int) -> str | None:
    """Why nothing answers on ``host:port``, or None when something does."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def describe_broker(why: str) -> None:
    from django.conf import settings
    from kombu.utils.url import maybe_sanitize_url

    url = settings.CELERY_BROKER_URL
    if embedded_broker():
        folder = shown(Path(str(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"])).parent)
        say(f"NOTICE: {why}.")
        say("The demo falls back to kombu's embedded filesystem:// transport: every message is")
        say(f"a file under {folder}/. It has no publisher confirms, so the relay counts a message")
        say("as dispatched once it is written. A worker keeps the messages it took in its own")
        say("memory, so the demo kills no worker, and there is no broker to stop: both faults")
        say("are skipped. This keeps the demo running anywhere; production runs on RabbitMQ")
        say("(start it, or set CELERY_BROKER_URL to your broker).")
    else:
        say(f"broker {maybe_sanitize_url(url)} ({why})")
        if has_confirms(url):
            say("the relay publishes persistent messages and waits for RabbitMQ's confirms")
        else:
            say("not RabbitMQ: the relay publishes without publisher confirms")
    say(f"queue {settings.DEMO_QUEUE} (one per state folder, apart from the tests' queues)")


def describe_cache(why: str) -> None:
    from django.core.cache import cache

    if os.environ["DEMO_CACHE_URL"]:
        say(f"cache {os.environ['DEMO_CACHE_URL']} ({why})")
        say("shared by every process: the metrics counters, and a fast path for finished keys")
    else:
        cache.clear()
        say(f"cache: files in {shown(demo_dir() / 'cache')} ({why})")
        say("shared by every process, though a counter may miss an increment when two add at once")


def embedded_broker() -> bool:
    from django.conf import settings

    return bool(settings.CELERY_BROKER_URL.startswith("filesystem://"))


def has_confirms(url: str) -> bool:
    """Whether the relay publishes with confirms: it does on py-amqp (RabbitMQ) connections."""
    from kombu import Connection

    return bool(Connection(url).transport.driver_name == "py-amqp")


def clear_broker() -> None:
    """Empty the demo's queue: what an interrupted run left there names orders of a deleted database."""
    from django.conf import settings
    from kombu.exceptions import OperationalError

    from demo.celery import app

    queue = app.amqp.queues[settings.DEMO_QUEUE]
    with app.connection_for_write() as connection:
        try:
            connection.ensure_connection(max_retries=2)
        except OperationalError as exc:
            raise Failed(f"cannot reach the broker at {connection.as_uri()}: {exc}") from exc
        bound = queue(connection.default_channel)
        bound.declare()
        stale = bound.purge() or 0
    if stale:
        say(f"removed {stale} stale messages left in the queue by an earlier run")
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {})
    if options.get("store_processed"):
        for processed in Path(options["processed_folder"]).glob("*.msg"):
            processed.unlink()


def forget_cache() -> None:
    """Drop this run's keys from Redis (its prefix is the run's: nothing else is touched)."""
    if not os.environ.get("DEMO_CACHE_URL"):
        return
    from django.core.cache import cache

    # Tidying up: a Redis gone by now costs nothing.
    with contextlib.suppress(Exception):
        cache.delete_pattern("*")  # django-redis: the keys with this run's prefix


# --------------------------------------------------------------------------------------------
# 3. Relay and workers


def start_services(services: Services) -> None:
    relay = services.relay()
    workers = [services.worker(), services.worker()]
    for worker in workers:
        wait_until_ready(worker)
    say(
        f"{'python manage.py reliable_tasks relay':<42} pid {relay.process.pid:<7} log {shown(relay.log)}"
    )
    for worker in workers:
        command = f"celery -A demo worker  ({worker.name})"
        say(f"{command:<42} pid {worker.process.pid:<7} log {shown(worker.log)}")
    say("each worker: prefork, 2 processes, -O fair, prefetch multiplier 1")
    say(
        f"RELIABLE_TASKS_MAX_DELIVERIES = {max_deliveries()}: a message whose deliveries kill their"
    )
    say("worker that many times becomes a dead task")


def wait_until_ready(worker: Service, timeout: float = 60.0) -> None:
    """Wait for the worker's "ready." line: orders and faults should meet a running worker."""
    deadline = time.monotonic() + timeout
    while " ready." not in worker.log.read_text(errors="replace"):
        if worker.process.poll() is not None:
            show_tail(worker.log)
            raise Failed(f"{worker.name} exited with code {worker.process.returncode}")
        if time.monotonic() > deadline:
            show_tail(worker.log)
            raise Failed(f"{worker.name} was not ready after {timeout:.0f} s")
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------
# 4. Orders and faults


@dataclass
class Faults:
    """The fault that outlives the loop placing orders: the broker outage, if one began."""

    outage: Outage | None = None


def place_orders(
    count: int, products: Sequence[Any], services: Services, faults: Faults
) -> list[Placed]:
    """Place ``count`` orders at a steady pace; kill a worker and stop the broker on the way."""
    global _clock
    rng = random.Random(SEED)
    poison = set(range(min(POISON_EVERY // 2 - 1, count // 2), count, POISON_EVERY))
    # Early enough that orders still come in while the broker is down: stopping RabbitMQ can
    # take several seconds.
    kill_at, outage_at = count // 5, count * 7 // 20
    seconds = count / ORDERS_PER_SECOND
    say(f"{count} orders over about {seconds:.0f} s; {len(poison)} of them for the {POISON[0]}")
    say("each: Order.objects.create(), charge_payment.delay(), send_receipt.delay(), one commit")
    write()
    placed: list[Placed] = []
    _clock = time.monotonic()
    for i in range(count):
        if i == kill_at:
            kill_a_worker(services)
        if i == outage_at:
            faults.outage = start_outage()
        time.sleep(max(0.0, _clock + i / ORDERS_PER_SECOND - time.monotonic()))
        product = products[-1] if i in poison else rng.choice(products[:-1])
        customer, quantity = rng.choice(CUSTOMERS), rng.randint(1, 3)
        placed.append(place_order(customer, product, quantity))
        if i == 0:
            first = placed[0]
            say(
                f"{elapsed()}  order #{first.order_id}: {customer}, {quantity} x {product.name}, committed"
            )
            say(
                f"                with charge_payment[{first.charge_task[:8]}...] and "
                f"send_receipt[{first.receipt_task[:8]}...]"
            )
        if (i + 1) % 50 == 0 or i + 1 == count:
            say(f"{elapsed()}  {i + 1:>4} orders placed")
    outage = faults.outage
    if outage is not None:
        outage.join()
    if outage is not None and outage.down_at and outage.up_at:
        during = sum(1 for p in placed if outage.down_at <= p.at <= outage.up_at)
        say(f"{during} orders were placed while the broker was down: their tasks waited in the")
        say("outbox, committed, until the relay could publish them")
    return placed


def place_order(customer: str, product: Any, quantity: int) -> Placed:
    from django.db import transaction

    from shop.models import Order
    from shop.tasks import charge_payment, send_receipt

    with transaction.atomic():
        order = Order.objects.create(
            customer=customer, product=product, quantity=quantity, total=product.price * quantity
        )
        charge = charge_payment.delay(order.id)
        receipt = send_receipt.delay(order.id)
    return Placed(order.id, charge.id, receipt.id, product.breaks_receipts, time.monotonic())


def kill_a_worker(services: Services) -> None:
    victim = next(s for s in services.running() if s.name.startswith("worker-"))
    if embedded_broker():
        # The embedded transport keeps the messages a worker took, unacknowledged, in that
        # worker's memory: killed, it takes them along. Killing only one of its pool processes
        # instead can strand the message being handed to it until the worker restarts
        # (Celery's prefork pool). RabbitMQ keeps unacknowledged messages itself.
        say(f"{elapsed()}  FAULT  worker kill skipped: with the embedded transport a killed worker")
        say("                takes the messages it holds along; RabbitMQ would hand them to")
        say("                another worker. (The poison product still kills pool processes.)")
        return
    os.killpg(victim.process.pid, signal.SIGKILL)
    victim.process.wait()
    victim.killed = True
    replacement = services.worker()
    say(f"{elapsed()}  FAULT  SIGKILL to {victim.name} and its pool processes: the messages it")
    say("                held, unacknowledged, go back to the queue for the other worker")
    say(f"                {replacement.name} (pid {replacement.process.pid}) starts in its place")


class Outage:
    """Stops RabbitMQ, and starts it again ``OUTAGE_SECONDS`` later, while the orders keep coming.

    Other test and chaos runs on this machine share the RabbitMQ: the outage holds an exclusive
    lock on /tmp/rt-rabbitmq.lock from before the stop until the broker serves again, and
    waits for it when another run holds it, so that two outages never overlap.
    """

    def __init__(self) -> None:
        self.down_at = 0.0
        self.up_at = 0.0
        self._lock: IO[str] | None = None
        self._thread = threading.Thread(target=self._run, name="broker-outage")

    def begin(self) -> bool:
        """Take the lock (orders wait meanwhile), then stop the broker and start it again, in
        the background; False (and a line saying why) if the lock stayed taken.
        """
        self._lock = RABBITMQ_LOCK.open("a")
        if not try_lock(self._lock):
            say(f"{elapsed()}  waiting for {RABBITMQ_LOCK}: another run is restarting RabbitMQ")
            deadline = time.monotonic() + LOCK_WAIT
            while not try_lock(self._lock):
                if time.monotonic() > deadline:
                    self._unlock()
                    say(f"{elapsed()}  FAULT  broker outage skipped: the lock stayed taken")
                    return False
                time.sleep(0.2)
        self._thread.start()
        return True

    def _run(self) -> None:
        say(
            f"{elapsed()}  FAULT  stopping RabbitMQ for {OUTAGE_SECONDS:.0f} s (rabbitmqctl stop_app) ..."
        )
        try:
            rabbitmqctl("stop_app")
        except RuntimeError as exc:
            say(f"{elapsed()}  FAULT  broker outage skipped: {exc}")
            rabbitmqctl_start()
            self._unlock()
            return
        self.down_at = time.monotonic()
        say(f"{elapsed()}  RabbitMQ is down: the relay and the workers lost their connections;")
        say("                orders keep committing")
        try:
            time.sleep(OUTAGE_SECONDS)
        finally:
            started = rabbitmqctl_start()
            self.up_at = time.monotonic()
            self._unlock()
        if started:
            say(
                f"{elapsed()}  RabbitMQ serves again (start_app, await_startup), "
                f"{self.up_at - self.down_at:.1f} s after it stopped"
            )

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        if self._thread.ident is not None:
            self._thread.join()

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases its flock
            self._lock = None


def try_lock(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def start_outage() -> Outage | None:
    from django.conf import settings

    url = urlsplit(settings.CELERY_BROKER_URL)
    why = ""
    if embedded_broker():
        why = "the embedded transport has no broker to stop"
    elif url.scheme not in ("amqp", "pyamqp") or url.hostname not in ("127.0.0.1", "localhost"):
        why = "the broker is not a RabbitMQ on this machine"
    elif shutil.which("rabbitmqctl") is None:
        why = "rabbitmqctl is not on the PATH"
    if why:
        say(f"{elapsed()}  FAULT  broker outage skipped: {why}")
        return None
    outage = Outage()
    return outage if outage.begin() else None


def rabbitmqctl(*args: str) -> None:
    try:
        done = subprocess.run(
            ["rabbitmqctl", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            # Out of the terminal's reach: a Ctrl-C must not leave RabbitMQ half started.
            start_new_session=True,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(
            f"rabbitmqctl {' '.join(args)} failed: {output[-1] if output else done.returncode}"
        )


def rabbitmqctl_start() -> bool:
    """Start RabbitMQ's app and wait until it serves; say loudly if it would not."""
    for attempt in range(3):
        try:
            rabbitmqctl("start_app")
            rabbitmqctl("await_startup")
            return True
        except RuntimeError as exc:
            error = exc
            time.sleep(1 + attempt)
    say(f"FAILED to start RabbitMQ again ({error}): run `rabbitmqctl start_app` yourself")
    return False


@dataclass(frozen=True)
class RolledBack:
    """The order that was never committed, and the ids its tasks were given."""

    order_id: int
    task_ids: tuple[str, str]


def place_rolled_back_order(products: Sequence[Any]) -> RolledBack:
    """An order whose transaction rolls back after ``.delay()``."""
    from django.db import transaction
    from reliable_tasks.models import OutboxMessage

    from shop.models import Order
    from shop.tasks import charge_payment, send_receipt

    class OutOfStock(Exception):
        pass

    ids: tuple[str, str] = ("", "")
    order_id = 0
    rows_inside = 0
    try:
        with transaction.atomic():
            order = Order.objects.create(
                customer="Mallory", product=products[2], total=Decimal("49.90")
            )
            order_id = order.pk
            ids = (charge_payment.delay(order.id).id, send_receipt.delay(order.id).id)
            rows_inside = OutboxMessage.objects.filter(task_id__in=ids).count()
            raise OutOfStock
    except OutOfStock:
        pass
    rows_after = OutboxMessage.objects.filter(task_id__in=ids).count()
    write()
    say("one more order, Mallory's: charge_payment.delay() and send_receipt.delay(), then the")
    say(f"stock check fails and the transaction rolls back. Its outbox rows: {rows_inside} inside")
    say(f"the transaction, {rows_after} after. (A plain Celery .delay() would have published")
    say("already: a charge for an order that does not exist.)")
    return RolledBack(order_id, ids)


# --------------------------------------------------------------------------------------------
# 5. Waiting


def wait_until_settled(placed: Sequence[Placed], services: Services) -> None:
    """Poll until every order is charged and has a receipt or a dead task, and the outbox is empty."""
    from reliable_tasks.models import DeadTask, OutboxMessage, OutboxStatus

    from shop.models import Order, Receipt

    ids = [p.order_id for p in placed]
    receipt_tasks = [p.receipt_task for p in placed]
    task_ids = [*(p.charge_task for p in placed), *receipt_tasks]
    total = len(placed)
    poisoned = sum(1 for p in placed if p.poison)
    started = time.monotonic()
    last: tuple[int, ...] | None = None
    next_line = 0.0
    while True:
        charged = Order.objects.filter(pk__in=ids).exclude(charge_id="").count()
        received = Receipt.objects.filter(order_id__in=ids).values("order_id").distinct().count()
        dead = DeadTask.objects.filter(task_id__in=task_ids).count()
        pending = OutboxMessage.objects.filter(
            task_id__in=task_ids, status=OutboxStatus.PENDING
        ).count()
        now = time.monotonic()
        state = (charged, received, dead, pending)
        settled = charged == total and received + dead >= total and pending == 0
        if state != last and (now >= next_line or settled):
            say(
                f"{now - started:5.1f} s   charged {charged:>3}/{total}   receipts {received:>3}/"
                f"{total - poisoned}   dead {dead}/{poisoned}   outbox rows pending {pending}"
            )
            last, next_line = state, now + 2.0
        if settled:
            return
        gone = services.died()
        if gone is not None:
            say(f"the {gone.name} exited with code {gone.process.returncode}; its log ends:")
            show_tail(gone.log)
            raise Failed(f"the {gone.name} died")
        if now - started > TIMEOUT:
            say(
                f"not settled after {TIMEOUT:.0f} s (DEMO_TIMEOUT); the report shows what is missing"
            )
            return
        time.sleep(0.25)


# --------------------------------------------------------------------------------------------
# 6. Report


@dataclass
class Tally:
    """What the database holds for this run's orders."""

    orders: int
    poison: dict[str, Placed]  # by the id of the receipt task that must die
    charged_once: int
    received_once: int
    calls: Counter[tuple[str, bool]]  # gateway calls by (outcome, answered)
    failed: dict[str, int]  # failed attempts by exception class
    redelivered: int
    dead: list[Any]
    lost: list[int]
    doubled: list[int]
    leaked: int
    pending: int
    held: int


def tally(placed: Sequence[Placed], rolled_back: RolledBack) -> Tally:
    from django.db.models import Count
    from reliable_tasks.models import (
        DeadTask,
        IdempotencyKey,
        LedgerState,
        OutboxMessage,
        OutboxStatus,
        TaskAttempt,
    )

    from shop.models import GatewayCall, GatewayCharge, Order, Receipt
    from shop.tasks import charge_payment

    ids = [p.order_id for p in placed]
    keys = [f"charge:{i}" for i in ids]
    task_ids = [*(p.charge_task for p in placed), *(p.receipt_task for p in placed)]
    gateway = GatewayCharge.objects.filter(order_number__in=ids)
    charges = Counter(gateway.values_list("order_number", flat=True))
    charge_of = dict(gateway.values_list("order_number", "charge_id"))
    recorded = dict(Order.objects.filter(pk__in=ids).values_list("pk", "charge_id"))
    receipts = Counter(Receipt.objects.filter(order_id__in=ids).values_list("order_id", flat=True))
    dead = list(DeadTask.objects.filter(task_id__in=task_ids).order_by("id"))
    dead_ids = {d.task_id for d in dead}
    attempts = TaskAttempt.objects.filter(task_id__in=task_ids)
    outbox = OutboxMessage.objects
    # Charged once: one charge at the gateway, and the order records that one.
    charged = {i for i in ids if charges[i] == 1 and recorded.get(i) == charge_of[i]}
    return Tally(
        orders=len(placed),
        poison={p.receipt_task: p for p in placed if p.poison},
        charged_once=len(charged),
        received_once=sum(1 for i in ids if receipts[i] == 1),
        calls=Counter(
            GatewayCall.objects.filter(idempotency_key__in=keys).values_list("outcome", "answered")
        ),
        failed=dict(
            attempts.filter(outcome=TaskAttempt.Outcome.FAILED)
            .values_list("exc_type")
            .annotate(n=Count("id"))
            .order_by()
        ),
        redelivered=attempts.filter(outcome=TaskAttempt.Outcome.LOST).count(),
        dead=dead,
        lost=[
            p.order_id
            for p in placed
            if charges[p.order_id] == 0
            or (charges[p.order_id] == 1 and p.order_id not in charged)
            or (receipts[p.order_id] == 0 and p.receipt_task not in dead_ids)
        ],
        doubled=[p.order_id for p in placed if charges[p.order_id] > 1 or receipts[p.order_id] > 1],
        leaked=outbox.filter(task_id__in=rolled_back.task_ids).count()
        + GatewayCharge.objects.filter(order_number=rolled_back.order_id).count(),
        pending=outbox.filter(task_id__in=task_ids, status=OutboxStatus.PENDING).count(),
        held=IdempotencyKey.objects.filter(
            task_name=charge_payment.name, key__in=keys, state=LedgerState.RUNNING
        ).count(),
    )


def report(placed: Sequence[Placed], rolled_back: RolledBack) -> int:
    """Count every order's effects in the database; 0 if none is lost or doubled, else 1."""
    from reliable_tasks import metrics

    t = tally(placed, rolled_back)
    calls = t.calls
    made = calls["charged", True] + calls["charged", False]
    replayed = calls["replayed", True] + calls["replayed", False]
    requests_lost = calls["lost", False]
    answers_lost = calls["charged", False] + calls["replayed", False]
    line(
        "orders placed",
        t.orders,
        f"{len(t.poison)} of them for the {POISON[0]}, the poison product",
    )
    line("rolled back", 1, f"Mallory's order: outbox rows and charges for it: {t.leaked}")
    line("charged once", t.charged_once, "one GatewayCharge per order, and the order records it")
    line(
        "  gateway calls",
        sum(calls.values()),
        f"{made} charged a card; {replayed} were answered from the",
    )
    more("idempotency key: the first charge returned, no card charged twice;")
    more(
        f"{requests_lost + answers_lost} timed out ({requests_lost} requests lost, {answers_lost} answers lost)"
    )
    line("receipts sent once", t.received_once, "one Receipt per order")
    failed = ", ".join(f"{n} {name.rsplit('.', 1)[-1]}" for name, n in sorted(t.failed.items()))
    line(
        "retried",
        sum(t.failed.values()),
        f"failed attempts, retried through the outbox: {failed or '-'}",
    )
    line(
        "redelivered", t.redelivered, "deliveries that ended without an outcome (worker or process"
    )
    more("killed, broker gone) and were delivered again")
    line("dead", len(t.dead), "kept with everything needed to replay them:")
    for d in t.dead:
        p = t.poison.get(d.task_id)
        call = f"order #{p.order_id}, {POISON[0]}" if p else f"args {d.args}"
        outcomes = ", ".join(a["outcome"] for a in d.attempts)
        more(f"#{d.pk} {d.task_name.rsplit('.', 1)[-1]}({call}): {d.reason} ({outcomes})")
    if any(d.reason == "crash_loop" for d in t.dead):
        more(f"crash_loop: {max_deliveries()} deliveries in a row killed their worker process;")
        more("the message was set aside and the queue flowed on")
    line("doubled", len(t.doubled), shorten(t.doubled))
    line(
        "lost",
        len(t.lost),
        shorten(t.lost) or "every order is charged, and has a receipt or a dead task",
    )
    write()
    counters = metrics.snapshot().counters
    say(
        f"metrics snapshot (counters in the cache, best effort): retries {counters.get('retries', 0)},"
    )
    say(
        f"duplicate hits {counters.get('duplicate_hits', 0)} (a finished key delivered again, not run),"
        f" deferrals {counters.get('deferrals', 0)}, dead tasks {counters.get('dead_tasks', 0)}"
    )

    expected = [d for d in t.dead if d.task_id in t.poison and d.reason == "crash_loop"]
    problems = [
        (t.lost, f"{len(t.lost)} orders lost a charge or a receipt"),
        (t.doubled, f"{len(t.doubled)} orders were charged twice or got two receipts"),
        (len(t.dead) > len(expected), "dead tasks besides the poison receipts"),
        (len(expected) < len(t.poison), "a poison receipt did not become a dead task"),
        (t.leaked, "the rolled-back order's tasks were written, sent or run"),
        (t.pending, f"{t.pending} outbox rows are still pending"),
        (t.held, f"{t.held} charge keys are still held by a lease"),
    ]
    failures = [text for found, text in problems if found]
    for text in failures:
        say(f"FAILED: {text}")
    return 1 if failures else 0


def max_deliveries() -> int:
    from reliable_tasks.conf import conf

    return int(conf.MAX_DELIVERIES)


def line(label: str, number: int, text: str) -> None:
    say(f"{label:<20} {number:>5}   {text}")


def more(text: str) -> None:
    say(f"{'':<20} {'':>5}   {text}")


# --------------------------------------------------------------------------------------------
# 7. The admin


def wants_admin() -> tuple[bool, str]:
    """Whether to leave the admin running, and why not."""
    if os.environ.get("DEMO_NO_ADMIN", "") not in ("", "0"):
        return False, "DEMO_NO_ADMIN is set"
    if os.environ.get("DEMO_ADMIN", "") not in ("", "0"):
        return True, ""
    if os.environ.get("CI", "") not in ("", "0", "false"):
        return False, "CI is set"
    if not sys.stdin.isatty():
        return False, "stdin is not a terminal"
    return True, ""


def run_admin(services: Services) -> None:
    """Serve the admin with a new superuser until Ctrl-C (KeyboardInterrupt) or a process dies."""
    from django.contrib.auth import get_user_model

    password = secrets.token_urlsafe(12)
    user, _ = get_user_model().objects.get_or_create(username="admin")
    user.is_staff = user.is_superuser = True
    user.set_password(password)
    user.save()
    port = free_port(ADMIN_PORT)
    # --insecure serves the admin's CSS and scripts with DEBUG off; --noreload keeps one process.
    admin = services.start(
        "admin", "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload", "--insecure"
    )
    deadline = time.monotonic() + 30
    while unreachable("127.0.0.1", port) is not None:
        if admin.process.poll() is not None or time.monotonic() > deadline:
            show_tail(admin.log)
            raise Failed("the admin (manage.py runserver) did not start")
        time.sleep(0.2)
    base = f"http://127.0.0.1:{port}"
    say(f"Django's admin is running: {base}/admin/")
    say(f"  user admin, password {password}")
    write()
    say(f"dead tasks   {base}/admin/reliable_tasks/deadtask/")
    say(f"health       {base}/reliable-tasks/health/")
    say(f"metrics      {base}/reliable-tasks/metrics/")
    write()
    say('To replay the poison receipts: in Shop > Products untick "breaks receipts" on the')
    say(f"{POISON[0]} (the cause, fixed), then select its dead tasks and requeue them. The relay")
    say("and the workers are still running: the receipts appear under Shop > Receipts.")
    say(f"Requests are logged in {shown(admin.log)}.")
    write()
    # Ctrl-D only from a terminal: asked for without one (DEMO_ADMIN=1), stdin may be /dev/null.
    ctrl_d = sys.stdin.isatty()
    say(
        f"Press Ctrl-C{' (or Ctrl-D)' if ctrl_d else ''} to stop the admin, the relay and the workers."
    )
    try:
        while True:
            gone = services.died()
            if gone is not None:
                say(f"the {gone.name} exited with code {gone.process.returncode}; its log ends:")
                show_tail(gone.log)
                return
            if not ctrl_d:
                time.sleep(0.5)
            elif terminal_closed(timeout=0.5):
                say("end of input: the demo ends.")
                return
    except KeyboardInterrupt:
        write()
        say("Ctrl-C: the demo ends.")


def terminal_closed(timeout: float) -> bool:
    """Wait up to ``timeout`` s for input; True on Ctrl-D or when the terminal went away.

    Lines typed meanwhile are read and ignored.
    """
    if not select.select([sys.stdin], [], [], timeout)[0]:
        return False
    try:
        return not os.read(sys.stdin.fileno(), 1024)
    except OSError:
        return True


def free_port(preferred: int) -> int:
    """``preferred`` if nothing listens there, else a port the system picks."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise Failed("no free port for the admin")


# --------------------------------------------------------------------------------------------
# Output


def step(number: int, title: str) -> None:
    write(f"\n{number}. {title}")


def say(text: str) -> None:
    write(f"   {text}".rstrip())


def write(text: str = "") -> None:
    """Print a line; a terminal that went away must not keep the demo from cleaning up."""
    with _print_lock, contextlib.suppress(OSError):
        print(text, flush=True)


def elapsed() -> str:
    return f"{time.monotonic() - _clock:5.1f} s"


def last_words(service: Service) -> str:
    """The relay's closing log line, which counts what it dispatched."""
    if service.name != "relay":
        return ""
    log = service.log.read_text(errors="replace").splitlines()
    lines = [line for line in log if " stopped; " in line]
    return f' ("{lines[-1].split(": ", 1)[-1].split("| ", 1)[-1]}")' if lines else ""


def shorten(found: Sequence[int], limit: int = 8) -> str:
    """A few of the orders at fault, for the report's line."""
    items = [f"#{k}" for k in found]
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def show_tail(log: Path, lines: int = 15) -> None:
    for text in log.read_text(errors="replace").splitlines()[-lines:]:
        say(f"| {text}")


def demo_dir() -> Path:
    from django.conf import settings

    return Path(settings.DEMO_DIR)


def shown(path: Path) -> str:
    """``path`` relative to the current directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@contextlib.contextmanager
def terminal_to_ourselves() -> Iterator[None]:
    """In a terminal, make the demo its foreground process group while the demo runs.

    Under ``make demo`` a Ctrl-C would reach make as well, and make dies of it however cleanly
    the demo ends: the demo takes the terminal so that the Ctrl-C is its alone, then gives the
    terminal back.
    """
    if not wants_admin()[0] or not sys.stdin.isatty():
        yield
        return
    tty = sys.stdin.fileno()
    previous = os.getpgrp()
    # A background group may not take the terminal unless SIGTTOU is ignored.
    ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        foreground = os.tcgetpgrp(tty)
        os.setpgid(0, 0)
        try:
            os.tcsetpgrp(tty, os.getpgrp())
        except OSError:
            os.setpgid(0, previous)
            raise
    except OSError:
        # Not possible here (a session leader, say): Ctrl-C then reaches make too.
        signal.signal(signal.SIGTTOU, ttou)
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(tty, foreground)
        signal.signal(signal.SIGTTOU, ttou)


if __name__ == "__main__":
    with terminal_to_ourselves():
        exit_code = main()
    sys.exit(exit_code)
