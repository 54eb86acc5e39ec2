"""``python manage.py reliable_tasks <subcommand>``: relay, status, prune, requeue, dead-letters."""

from __future__ import annotations

import json
import logging
import math
import time
from argparse import ArgumentParser
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from reliable_tasks import dead, ledger, outbox
from reliable_tasks.conf import conf

SUBCOMMANDS = "relay, status, prune, requeue or dead-letters"


class Command(BaseCommand):
    help = (
        "Operate reliable_tasks: run the outbox relay, show the status, prune, requeue dead tasks."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(
            dest="subcommand", metavar="{relay,status,prune,requeue,dead-letters}"
        )
        relay = sub.add_parser(
            "relay", help="Publish committed outbox rows to the broker until stopped."
        )
        relay.add_argument("--name", help="Name in heartbeats (default hostname:pid).")
        relay.add_argument("--once", action="store_true", help="Relay what is due now, then exit.")
        relay.add_argument(
            "--timeout",
            type=float,
            default=60.0,
            help="With --once: give up after this many seconds (default 60).",
        )
        status = sub.add_parser(
            "status", help="Show the outbox, the relays, retries, dead tasks and the ledger."
        )
        status.add_argument("--json", action="store_true", help="One JSON object, for machines.")
        status.add_argument(
            "--watch", type=float, metavar="SECONDS", help="Refresh every SECONDS until Ctrl-C."
        )
        prune = sub.add_parser(
            "prune",
            help="Delete dispatched outbox rows, expired keys and old dead tasks past their retention.",
        )
        prune.add_argument(
            "--batch-size", type=int, default=None, help="Rows per DELETE statement."
        )
        requeue = sub.add_parser("requeue", help="Send dead tasks again through the outbox.")
        requeue.add_argument(
            "--id", type=int, action="append", dest="ids", help="A dead task's id (repeatable)."
        )
        requeue.add_argument("--task", help="Only dead tasks of this task name.")
        requeue.add_argument(
            "--reason", choices=[r.value for r in dead.DeadReason], help="Only this reason."
        )
        requeue.add_argument("--exc-type", help="Only this exception class (dotted name).")
        requeue.add_argument(
            "--since", help="Only dead tasks whose last failure is at or after this ISO time."
        )
        requeue.add_argument(
            "--renew-key", action="store_true", help="Run under new idempotency keys."
        )
        requeue.add_argument(
            "--all", action="store_true", help="Every dead task (needed when no filter is given)."
        )
        requeue.add_argument(
            "--dry-run", action="store_true", help="Say how many would be requeued; change nothing."
        )

        letters = sub.add_parser(
            "dead-letters",
            help="Store what a quorum queue dead-lettered as dead tasks (see reliable_tasks.topology).",
        )
        letters.add_argument(
            "--queue", required=True, help="The task queue whose dead letters to move."
        )
        letters.add_argument("--follow", action="store_true", help="Keep moving them until Ctrl-C.")
        letters.add_argument(
            "--interval", type=float, default=5.0, help="With --follow: seconds between passes."
        )

    def handle(self, *args: Any, subcommand: str | None = None, **options: Any) -> None:
        actions: dict[str, Callable[[dict[str, Any]], None]] = {
            "relay": self._relay,
            "status": self._status,
            "prune": self._prune,
            "requeue": self._requeue,
            "dead-letters": self._dead_letters,
        }
        if subcommand not in actions:
            raise CommandError(f"name a subcommand: {SUBCOMMANDS} (see --help)")
        actions[subcommand](options)

    # -- relay -------------------------------------------------------------------------------

    def _relay(self, options: dict[str, Any]) -> None:
        from reliable_tasks.relay import Relay

        if options["verbosity"] >= 1:
            logging.basicConfig(
                level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
        if options["once"]:
            _positive("--timeout", options["timeout"])
        relay = Relay(name=options["name"])
        if options["once"]:
            with relay:
                try:
                    sent = relay.drain(timeout=options["timeout"])
                except TimeoutError as exc:
                    raise CommandError(
                        f"{exc}; is the broker reachable? Rows stay pending: nothing is lost. "
                        "Run the relay again once the broker is back."
                    ) from None
            self.stdout.write(f"dispatched {sent} messages")
            return
        relay.install_signal_handlers()
        relay.run()

    # -- status ------------------------------------------------------------------------------

    def _status(self, options: dict[str, Any]) -> None:
        from reliable_tasks import health

        interval = options["watch"]
        if interval is not None:
            _positive("--watch", interval)
        while True:
            result = health.check()
            if result.snapshot is None:
                raise CommandError("; ".join(result.reasons))
            if options["json"]:
                data = result.snapshot.as_dict()
                data["health"] = {"ok": result.ok, "reasons": result.reasons}
                self.stdout.write(json.dumps(data, sort_keys=True))
            else:
                if interval is not None and self.stdout.isatty():
                    self.stdout.write(
                        "\033[2J\033[H", ending=""
                    )  # clear the screen between refreshes
                self.stdout.write(_describe(result))
            if interval is None:
                return
            try:
                time.sleep(interval)
            except KeyboardInterrupt:
                return

    # -- prune -------------------------------------------------------------------------------

    def _prune(self, options: dict[str, Any]) -> None:
        limit = options["batch_size"]
        if limit is None:
            limit = conf.PRUNE_BATCH_SIZE
        elif limit < 1:
            raise CommandError(
                f"--batch-size takes a number of rows of at least 1, got {limit}; leave it out "
                f"to use RELIABLE_TASKS_PRUNE_BATCH_SIZE ({conf.PRUNE_BATCH_SIZE})"
            )
        progress = _Progress(
            self.stdout, enabled=self.stdout.isatty() and options["verbosity"] >= 1
        )
        deleted = [
            _repeat(module.prune, limit, progress.step(what, module.prunable))
            for what, module in (
                ("dispatched outbox rows", outbox),
                ("idempotency keys", ledger),
                ("old dead tasks and attempt records", dead),
            )
        ]
        self.stdout.write(
            "pruned {} dispatched outbox rows, {} idempotency keys and {} old dead tasks and "
            "attempt records".format(*deleted)
        )

    # -- requeue -----------------------------------------------------------------------------

    def _requeue(self, options: dict[str, Any]) -> None:
        from reliable_tasks.models import DeadStatus, DeadTask

        filters = ("ids", "task", "reason", "exc_type", "since")
        if not options["all"] and not any(options[f] for f in filters):
            raise CommandError(
                "say which dead tasks to requeue: --id, --task, --reason, --exc-type or --since, "
                "or --all for every one (try --dry-run first)"
            )
        tasks = DeadTask.objects.using(conf.DATABASE).filter(status=DeadStatus.DEAD)
        if options["ids"]:
            tasks = tasks.filter(pk__in=options["ids"])
        if options["task"]:
            tasks = tasks.filter(task_name=options["task"])
        if options["reason"]:
            tasks = tasks.filter(reason=options["reason"])
        if options["exc_type"]:
            tasks = tasks.filter(exc_type=options["exc_type"])
        if options["since"]:
            tasks = tasks.filter(last_failed_at__gte=_parse_since(options["since"]))
        count = tasks.count()
        if options["dry_run"]:
            self.stdout.write(f"would requeue {count} dead tasks (dry run: nothing changed)")
            return
        unsendable: list[DeadTask] = []
        done = dead.requeue_many(
            tasks,
            renew_key=options["renew_key"],
            user="manage.py reliable_tasks requeue",
            on_skip=lambda task, exc: unsendable.append(task),
        )
        # The rest were requeued or discarded by someone else between the count and the
        # requeue, or locked by another requeue or discard still at work: theirs to act on.
        busy = count - done - len(unsendable)
        notes = []
        if unsendable:
            notes.append(
                f"{len(unsendable)} cannot be sent again as they are (see the log): discard them"
            )
        if busy > 0:
            notes.append(
                f"{busy} were left alone: someone else was requeueing or discarding them at the "
                "same time (run this again to requeue those still dead)"
            )
        self.stdout.write(
            f"requeued {done} dead tasks through the outbox{''.join('; ' + n for n in notes)}"
        )

    # -- dead letters ------------------------------------------------------------------------

    def _dead_letters(self, options: dict[str, Any]) -> None:
        from reliable_tasks import topology
        from reliable_tasks.relay import get_celery_app

        _positive("--interval", options["interval"])
        with get_celery_app().connection_for_write() as connection:
            if options["follow"]:
                try:
                    topology.follow_dead_letters(
                        connection, options["queue"], interval=options["interval"]
                    )
                except KeyboardInterrupt:
                    return
            moved = topology.move_dead_letters(connection, options["queue"])
        self.stdout.write(
            f"moved {moved} dead-lettered messages of {options['queue']} into dead tasks"
        )


def _parse_since(value: str) -> datetime:
    example = "an ISO 8601 time such as 2026-11-28T09:00:00+00:00"
    try:
        parsed = parse_datetime(value)
    except ValueError as exc:  # well formed, but no such time: 2026-02-30, 25:00
        raise CommandError(f"--since {value!r} is no valid time ({exc}); give {example}") from None
    if parsed is None:
        raise CommandError(f"--since takes {example}, got {value!r}")
    # A time without an offset is in the project's time zone, as Django reads it elsewhere.
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed)


def _positive(option: str, seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds > 0):
        raise CommandError(f"{option} takes a finite number of seconds > 0, got {seconds}")


def _describe(result: Any) -> str:
    s = result.snapshot
    age = "-" if s.oldest_due_age_seconds is None else f"{s.oldest_due_age_seconds:.1f} s"
    lines = [
        f"reliable_tasks status at {s.taken_at:%Y-%m-%d %H:%M:%S %Z}: {'OK' if result.ok else 'FAILING'}",
        *(f"  ! {reason}" for reason in result.reasons),
        "",
        f"outbox      pending {s.outbox_pending}   due {s.outbox_due}   oldest due waited {age}",
        f"            refused by the broker {s.outbox_failing}   dispatched in the last minute {s.dispatched_last_minute}   retries scheduled {s.retries_scheduled}",
        "relays      " + ("none has run" if not s.relays else ""),
        *(
            f"  {r.name:<32} {'stopped' if r.stopped else 'running'}   last seen {r.seconds_since_seen:.1f} s ago"
            f"   dispatched {r.dispatched_total}"
            for r in s.relays
        ),
        f"dead tasks  {s.dead_total}",
        *(f"  {reason:<16} {n}" for reason, n in sorted(s.dead_by_reason.items())),
        *(
            f"  {task:<40} {n}"
            for task, n in sorted(s.dead_by_task.items(), key=lambda kv: -kv[1])[:10]
        ),
        f"ledger      {'~' if s.ledger_keys_estimated else ''}{s.ledger_keys} keys",
        "workers     duplicates answered {duplicate_hits}   deferred {deferrals}   retried {retries}".format(
            **s.counters
        ),
    ]
    return "\n".join(lines)


class _Progress:
    """A progress bar per kind of row, on a terminal; silent elsewhere."""

    WIDTH = 30

    def __init__(self, out: Any, *, enabled: bool) -> None:
        self.out = out
        self.enabled = enabled

    def step(self, what: str, prunable: Callable[[], int]) -> Callable[[int | None], None]:
        """A callback for one kind of row: the rows deleted so far, None when it is done."""
        if not self.enabled:
            return lambda deleted: None
        total = prunable()  # counted once, over the indexes the pruning itself uses
        count = 0

        def show(deleted: int | None) -> None:
            nonlocal count
            done = deleted is None
            count = count if deleted is None else deleted
            # Rows that expire while pruning runs are deleted too: the total grows with them.
            whole = max(total, count)
            filled = self.WIDTH if done else self.WIDTH * count // (whole or 1)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self.out.write(
                f"\r{what:<36} [{bar}] {count:,} / {whole:,}", ending="\n" if done else ""
            )
            self.out.flush()

        show(0)
        return show


def _repeat(prune: Callable[..., int], limit: int, progress: Callable[[int | None], None]) -> int:
    """Run a batch pruner until it finds nothing more; return how many rows it deleted."""
    total = 0
    while deleted := prune(limit=limit):
        total += deleted
        progress(total)
    progress(None)
    return total
