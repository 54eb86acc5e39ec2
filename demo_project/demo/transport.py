"""kombu's embedded ``filesystem://`` transport, with redeliveries marked where Celery looks.

When a worker puts a message back (its pool process died running it), kombu's in-process
transports flag the message as redelivered on the message itself, while Celery, and with it
reliable_tasks, read ``delivery_info["redelivered"]``, which RabbitMQ fills. reliable_tasks
counts the deliveries of a message that kills its worker only on redeliveries: without this,
on the embedded fallback the poison product would kill worker processes forever instead of
becoming a dead task.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import filesystem


class Channel(filesystem.Channel):
    def _restore(self, message: Any) -> None:
        # delivery_info is the dict the message is written back with.
        message.delivery_info["redelivered"] = True
        super()._restore(message)


class Transport(filesystem.Transport):
    Channel = Channel
