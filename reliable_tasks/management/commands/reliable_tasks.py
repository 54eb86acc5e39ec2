"""``python manage.py reliable_tasks <subcommand>``: relay, prune."""

from __future__ import annotations

import logging
from argparse import ArgumentParser
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from reliable_tasks import dead, ledger, outbox
from reliable_tasks.conf import conf


class Command(BaseCommand):
    help = "Operate reliable_tasks: run the outbox relay, prune old rows."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", metavar="{relay,prune}")
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
        prune = sub.add_parser(
            "prune", help="Delete dispatched outbox rows and idempotency keys past their retention."
        )
        prune.add_argument(
            "--batch-size", type=int, default=None, help="Rows per DELETE statement."
        )

    def handle(self, *args: Any, subcommand: str | None = None, **options: Any) -> None:
        if subcommand == "relay":
            self._relay(options)
        elif subcommand == "prune":
            self._prune(options)
        else:
            raise CommandError("name a subcommand: relay or prune (see --help)")

    def _relay(self, options: dict[str, Any]) -> None:
        from reliable_tasks.relay import Relay

        if options["verbosity"] >= 1:
            logging.basicConfig(
                level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
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

    def _prune(self, options: dict[str, Any]) -> None:
        limit = options["batch_size"] or conf.PRUNE_BATCH_SIZE
        if limit < 1:
            raise CommandError(f"--batch-size must be at least 1, got {limit}")
        rows = _repeat(outbox.prune, limit)
        keys = _repeat(ledger.prune, limit)
        old = _repeat(dead.prune, limit)
        self.stdout.write(
            f"pruned {rows} dispatched outbox rows, {keys} idempotency keys and {old} old dead tasks and attempt records"
        )


def _repeat(prune: Callable[..., int], limit: int) -> int:
    """Run a batch pruner until it finds nothing more; return how many rows it deleted."""
    total = 0
    while deleted := prune(limit=limit):
        total += deleted
    return total
