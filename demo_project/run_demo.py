"""The reliable_tasks demo: a shop that sends one receipt per order, in the background.

Run it with ``make demo``. It

1. migrates the demo database: SQLite in ``.demo/``, fresh on every run, or the PostgreSQL
   named by ``DATABASE_URL``;
2. picks the broker: ``CELERY_BROKER_URL`` if set, else the RabbitMQ on 127.0.0.1:5672, else
   (with a notice) kombu's embedded ``filesystem://`` transport in ``.demo/broker/``;
   ``DEMO_BROKER=embedded`` takes the fallback even when RabbitMQ is up;
3. starts the relay and a Celery worker, their logs in ``.demo/``;
4. places orders, each committing ``send_receipt.delay(order.id)`` with the order, and one whose
   transaction rolls back after ``.delay()``;
5. waits until every committed order has its receipt (``DEMO_TIMEOUT``, 60 s), stops both
   processes with SIGTERM (also on Ctrl-C) and reports. It exits 1 if a receipt is missing or
   doubled, or the rolled-back order's task was sent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
ORDERS = int(os.environ.get("DEMO_ORDERS", "20"))
TIMEOUT = float(os.environ.get("DEMO_TIMEOUT", "60"))
STOP_TIMEOUT = 30.0
CUSTOMERS = ("Ada", "Grace", "Alan", "Barbara", "Edsger", "Margaret", "Donald", "Frances")


@dataclass(frozen=True)
class Placed:
    """A committed order and the id of the task that must send its receipt."""

    order_id: int
    task_id: str


@dataclass(frozen=True)
class Service:
    """A process the demo started: the relay or the worker."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path


class PaymentDeclined(Exception):
    """Raised on purpose after ``.delay()``, to roll the order's transaction back."""


def main() -> int:
    # SIGTERM to the demo stops it the way Ctrl-C does: relay and worker are stopped first.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(
        "reliable_tasks demo: a shop sends a receipt for every order, in the background.\n"
        "Each order commits together with its task, a row in the outbox table; the relay publishes\n"
        "committed rows to the broker; a Celery worker runs them. Every committed order must get\n"
        "exactly one receipt, and an order that rolled back none."
    )
    broker_url, broker_why = choose_broker()
    # Set before Django reads the settings; the relay and the worker inherit both.
    os.environ["CELERY_BROKER_URL"] = broker_url
    os.environ["DJANGO_SETTINGS_MODULE"] = "demo.settings"
    sys.path.insert(0, str(PROJECT_DIR))
    import django

    django.setup()

    step(1, "Database")
    fresh = migrate()
    step(2, "Broker")
    describe_broker(broker_why)
    if fresh:
        clear_broker()

    services: list[Service] = []
    interrupted = False
    try:
        step(3, "Relay and worker")
        services = start_services()
        step(4, "Orders: Order.objects.create() and send_receipt.delay() in one transaction each")
        placed = place_orders(ORDERS)
        rolled_back = place_rolled_back_order()
        step(5, "Waiting for the receipts")
        wait_for_receipts(placed, services)
        step(6, "Stopping the relay and the worker with SIGTERM")
    except KeyboardInterrupt:
        interrupted = True
        print("\nInterrupted: stopping the relay and the worker with SIGTERM.")
    finally:
        # On errors too: the demo never leaves a relay or a worker running behind it.
        stopped_cleanly = stop_services(services)
    if interrupted:
        return 130
    return report(placed, rolled_back, stopped_cleanly)


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
    say("migrated: reliable_tasks (outbox and co.) and shop (orders, receipts)")
    return fresh


# --------------------------------------------------------------------------------------------
# 2. Broker


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
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return RABBITMQ_URL, "RabbitMQ answers on 127.0.0.1:5672"
    except OSError as exc:
        return "filesystem://", f"no RabbitMQ answers on 127.0.0.1:5672 ({exc.strerror or exc})"


def describe_broker(why: str) -> None:
    from django.conf import settings
    from kombu.utils.url import maybe_sanitize_url

    url = settings.CELERY_BROKER_URL
    if url.startswith("filesystem://"):
        folder = shown(Path(str(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"])).parent)
        say(f"NOTICE: {why}.")
        say("The demo falls back to kombu's embedded filesystem:// transport: every message is")
        say(f"a file under {folder}/. It has no publisher confirms, so the relay counts a message")
        say("as dispatched once it is written. This keeps the demo running anywhere; production")
        say("runs on RabbitMQ (start it, or set CELERY_BROKER_URL to your broker).")
    else:
        say(f"{maybe_sanitize_url(url)} ({why})")
        if has_confirms(url):
            say("the relay publishes persistent messages and waits for RabbitMQ's confirms")
        else:
            say("not RabbitMQ: the relay publishes without publisher confirms")
    say(f"queue {settings.DEMO_QUEUE} (one per checkout, apart from the tests' queues)")


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
            sys.exit(f"\nFAILED: cannot reach the broker at {connection.as_uri()}: {exc}")
        bound = queue(connection.default_channel)
        bound.declare()
        stale = bound.purge() or 0
    if stale:
        say(f"removed {stale} stale messages left in the queue by an earlier run")
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {})
    if options.get("store_processed"):
        for processed in Path(options["processed_folder"]).glob("*.msg"):
            processed.unlink()


# --------------------------------------------------------------------------------------------
# 3. Relay and worker


def start_services() -> list[Service]:
    from django.conf import settings

    relay = start("relay", "manage.py", "reliable_tasks", "relay")
    worker = start(
        "worker", "-m", "celery", "-A", "demo", "worker", "--loglevel", "info",
        "--queues", settings.DEMO_QUEUE, "--concurrency", "2",
        "--hostname", f"demo-shop-{os.getpid()}@%h",
        # Gossip, mingle and heartbeats coordinate a cluster of workers; the demo has one.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    )  # fmt: skip
    for service, command in (
        (relay, "python manage.py reliable_tasks relay"),
        (worker, "celery -A demo worker --concurrency 2"),
    ):
        say(f"{command:<40} pid {service.process.pid:<7} log {shown(service.log)}")
    return [relay, worker]


def start(name: str, *argv: str) -> Service:
    from django.conf import settings

    log = Path(settings.DEMO_DIR) / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, *argv],
            cwd=PROJECT_DIR,
            stdout=out,
            stderr=subprocess.STDOUT,
            # A session of its own: Ctrl-C reaches only the demo, which then stops it with SIGTERM.
            start_new_session=True,
        )
    return Service(name, process, log)


# --------------------------------------------------------------------------------------------
# 4. Orders


def place_orders(count: int) -> list[Placed]:
    from django.db import transaction

    from shop.models import Order
    from shop.tasks import send_receipt

    placed: list[Placed] = []
    started = time.monotonic()
    for i in range(count):
        customer = CUSTOMERS[i % len(CUSTOMERS)]
        with transaction.atomic():
            order = Order.objects.create(customer=customer, total=Decimal(f"{10 + 7 * i}.50"))
            result = send_receipt.delay(order.id)
        placed.append(Placed(order.id, result.id))
        if i < 3:
            say(f"order #{order.id:<3} {customer:<8} {order.total:>7}  committed, task {result.id}")
    if count > 3:
        say(f"... and {count - 3} more the same way")
    elapsed = time.monotonic() - started
    say(f"{count} orders committed in {elapsed:.2f} s: .delay() wrote a row, it called no broker")
    return placed


def place_rolled_back_order() -> str:
    """An order whose payment fails after ``.delay()``; return the task id it was given."""
    from django.db import transaction
    from reliable_tasks.models import OutboxMessage

    from shop.models import Order
    from shop.tasks import send_receipt

    task_id = ""
    rows_inside = 0
    try:
        with transaction.atomic():
            order = Order.objects.create(customer="Mallory", total=Decimal("999.00"))
            task_id = send_receipt.delay(order.id).id
            rows_inside = OutboxMessage.objects.filter(task_id=task_id).count()
            raise PaymentDeclined
    except PaymentDeclined:
        pass
    rows_after = OutboxMessage.objects.filter(task_id=task_id).count()
    say(f"one more order, Mallory's: send_receipt.delay() gives task {task_id};")
    say(f"  outbox rows for it inside the transaction: {rows_inside}")
    say(f"  then the payment is declined and the transaction rolls back; outbox rows: {rows_after}")
    say("  (a plain Celery .delay() would have sent the message already: a receipt for nothing)")
    return task_id


# --------------------------------------------------------------------------------------------
# 5. Waiting


def wait_for_receipts(placed: Sequence[Placed], services: Sequence[Service]) -> bool:
    """Poll until every order has a receipt; False on timeout or if a process died."""
    from reliable_tasks.models import OutboxMessage, OutboxStatus

    from shop.models import Receipt

    rows = OutboxMessage.objects.filter(task_id__in=[p.task_id for p in placed])
    receipts = Receipt.objects.filter(order_id__in=[p.order_id for p in placed])
    total = len(placed)
    started = time.monotonic()
    last: tuple[int, int] | None = None
    next_line = 0.0
    while True:
        dispatched = rows.filter(status=OutboxStatus.DISPATCHED).count()
        received = receipts.values("order_id").distinct().count()
        now = time.monotonic()
        if (dispatched, received) != last and (now >= next_line or received == total):
            say(
                f"{now - started:5.1f} s   outbox rows dispatched {dispatched:>3}/{total}"
                f"   orders with a receipt {received:>3}/{total}"
            )
            last, next_line = (dispatched, received), now + 0.5
        if received == total:
            return True
        for service in services:
            code = service.process.poll()
            if code is not None:
                say(f"FAILED: the {service.name} exited with code {code}; its log ends:")
                show_tail(service.log)
                return False
        if now - started > TIMEOUT:
            say(f"FAILED: {total - received} orders lack a receipt after {TIMEOUT:.0f} s. Logs:")
            for service in services:
                say(f"--- {shown(service.log)}")
                show_tail(service.log)
            return False
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# 6. Stopping


def stop_services(services: Sequence[Service]) -> bool:
    """SIGTERM each process and wait for it to exit; kill it if it will not. True if all were clean."""
    for service in services:
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
    clean = True
    for service in services:
        try:
            code = service.process.wait(timeout=STOP_TIMEOUT)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait()
            say(f"{service.name}: did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM; killed")
            clean = False
            continue
        clean = clean and code == 0
        say(f"{service.name}: exited with code {code}{last_words(service)}")
    return clean


def last_words(service: Service) -> str:
    """The relay's closing log line, which counts what it dispatched."""
    if service.name != "relay":
        return ""
    log = service.log.read_text(errors="replace").splitlines()
    lines = [line for line in log if " stopped; " in line]
    return f' ("{lines[-1].split(": ", 1)[-1]}")' if lines else ""


# --------------------------------------------------------------------------------------------
# 7. Report


def report(placed: Sequence[Placed], rolled_back_task: str, stopped_cleanly: bool) -> int:
    from django.conf import settings
    from django.db.models import Count
    from reliable_tasks.models import OutboxMessage, OutboxStatus

    from shop.models import Receipt

    receipts = dict(
        Receipt.objects.filter(order_id__in=[p.order_id for p in placed])
        .values_list("order_id")
        .annotate(n=Count("id"))
    )
    missing = [p.order_id for p in placed if p.order_id not in receipts]
    doubled = {order_id: n for order_id, n in receipts.items() if n > 1}
    dispatched = OutboxMessage.objects.filter(
        task_id__in=[p.task_id for p in placed], status=OutboxStatus.DISPATCHED
    ).count()
    leaked = OutboxMessage.objects.filter(task_id=rolled_back_task).count() + (
        Receipt.objects.filter(task_id=rolled_back_task).count()
    )
    how = "confirmed by" if has_confirms(settings.CELERY_BROKER_URL) else "written to"

    step(7, "Report")
    say(f"orders committed          {len(placed):>4}")
    say(f"orders rolled back        {1:>4}   outbox rows and receipts for it: {leaked}")
    pending = f"; {len(placed) - dispatched} still pending" if dispatched < len(placed) else ""
    say(f"outbox rows dispatched    {dispatched:>4}   each {how} the broker{pending}")
    say(f"receipts                  {sum(receipts.values()):>4}   for {len(receipts)} orders")
    say(f"lost                      {len(missing):>4}   {shorten(missing)}")
    say(f"doubled                   {len(doubled):>4}   {shorten(doubled)}")
    problems = []
    if missing:
        problems.append(f"orders without a receipt: {len(missing)}")
    if doubled:
        problems.append(f"orders with more than one: {len(doubled)}")
    if leaked:
        problems.append("the rolled-back order's task was written or sent")
    if not stopped_cleanly:
        problems.append("the relay or the worker did not stop cleanly on SIGTERM")
    print()
    if problems:
        print(f"FAILED: {'; '.join(problems)}. The logs are in {shown(Path(settings.DEMO_DIR))}/.")
        return 1
    print("OK: every committed order got exactly one receipt, and the rolled-back order none.")
    return 0


# --------------------------------------------------------------------------------------------
# Output


def step(number: int, title: str) -> None:
    print(f"\n{number}. {title}")


def say(text: str) -> None:
    print(f"   {text}".rstrip(), flush=True)


def shorten(found: Sequence[int] | dict[int, int], limit: int = 8) -> str:
    """A few of the orders at fault, for the report's line."""
    items = (
        [f"#{k}: {v} receipts" for k, v in found.items()]
        if isinstance(found, dict)
        else [f"#{k}" for k in found]
    )
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def show_tail(log: Path, lines: int = 15) -> None:
    for line in log.read_text(errors="replace").splitlines()[-lines:]:
        say(f"| {line}")


def shown(path: Path) -> str:
    """``path`` relative to the current directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
