"""``python manage.py reliable_tasks <subcommand>``: relay, prune."""

from __future__ import annotations

import logging
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from reliable_tasks import outbox
from reliable_tasks.conf import conf


class Command(BaseCommand):
    help = "Operate reliable_tasks: run the outbox relay, prune old rows."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", metavar="{relay,prune}")
        relay = sub.add_parser("relay", help="Publish committed outbox rows to the broker until stopped.")
        relay.add_argument("--name", help="Name in heartbeats (default hostname:pid).")
        relay.add_argument("--once", action="store_true", help="Relay what is due now, then exit.")
        prune = sub.add_parser("prune", help="Delete dispatched outbox rows past their retention.")
        prune.add_argument("--batch-size", type=int, default=None, help="Rows per DELETE statement.")

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
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        relay = Relay(name=options["name"])
        if options["once"]:
            sent = relay.drain()
            self.stdout.write(f"dispatched {sent} messages")
            return
        relay.install_signal_handlers()
        relay.run()

    def _prune(self, options: dict[str, Any]) -> None:
        limit = options["batch_size"] or conf.PRUNE_BATCH_SIZE
        if limit < 1:
            raise CommandError(f"--batch-size must be at least 1, got {limit}")
        total = 0
        while deleted := outbox.prune(limit=limit):
            total += deleted
        self.stdout.write(f"pruned {total} dispatched outbox rows")
