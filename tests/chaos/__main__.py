"""``python -m tests.chaos [--small] [--seed N] [--tasks N] [--keep]`` (``make chaos``)."""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys

from . import plan, run


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description="Enqueue many tasks while killing processes and stopping services; check "
        "that every effect happened exactly once.",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="The run inside `make test`: 600 tasks, shorter outages.",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="Replay a run (default: a random seed, printed)."
    )
    parser.add_argument("--tasks", type=int, default=None, help="Override the number of tasks.")
    parser.add_argument(
        "--keep", action="store_true", help="Keep the run's database and logs for inspection."
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    profile = plan.SMALL if args.small else plan.FULL
    if args.tasks is not None:
        profile = dataclasses.replace(profile, tasks=args.tasks)
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    names = run.configure(seed)
    # SIGTERM and Ctrl-C cut the run short: it stops its processes, restarts any service it
    # stopped and drops its database before it exits.
    run.install_signal_handlers()
    return run.main(profile, seed, names, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
