"""A raw AMQP consumer that notes when each task message arrives.

``python -m benchmarks.consumer QUEUE COUNT TIMEOUT`` consumes ``QUEUE`` (no acks, no Celery,
no Django) until ``COUNT`` messages arrived or ``TIMEOUT`` seconds passed, then prints one JSON
object: task id -> arrival time (``time.time()``). It runs in its own process so that the
benchmark's producer never holds it up: the measured latency is the relay's.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import amqp


def consume(queue: str, count: int, timeout: float) -> dict[str, float]:
    """Arrival time of each message on ``queue``, keyed by its Celery task id."""
    arrived: dict[str, float] = {}

    def on_message(message: Any) -> None:
        arrived[str(message.headers["id"])] = time.time()

    connection = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
    connection.connect()
    try:
        channel = connection.channel()
        channel.basic_consume(queue, callback=on_message, no_ack=True)
        print("ready", flush=True)
        deadline = time.monotonic() + timeout
        while len(arrived) < count and time.monotonic() < deadline:
            try:
                connection.drain_events(timeout=0.5)
            except TimeoutError:
                continue
    finally:
        connection.close()
    return arrived


def main(argv: list[str]) -> None:
    queue, count, timeout = argv[0], int(argv[1]), float(argv[2])
    json.dump(consume(queue, count, timeout), sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
