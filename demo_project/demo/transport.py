"""kombu's embedded ``filesystem://`` transport, with redeliveries marked where Celery looks,
and each message file written whole before a worker can see it.

When a worker puts a message back (its pool process died running it), kombu's in-process
transports flag the message as redelivered on the message itself, while Celery, and with it
reliable_tasks, read ``delivery_info["redelivered"]``, which RabbitMQ fills. reliable_tasks
counts the deliveries of a message that kills its worker only on redeliveries: without this,
on the embedded fallback the poison product would kill worker processes forever instead of
becoming a dead task.

kombu writes a message's file in place, under its final name, and a worker listing the folder
meanwhile can take the file before its content is there: the worker's consumer then dies on
"Expecting value: line 1 column 1" (kombu issue 1551; seen here once, in CI). Here the file is
written under a name no queue matches, then renamed to its final name, which the file system
does at once.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _restore(self, message: Any) -> None:
        # delivery_info is the dict the message is written back with.
        message.delivery_info["redelivered"] = True
        super()._restore(message)

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        # The name kombu's reader looks for ("<stamp>_<id>.<queue>.msg", oldest stamp first);
        # ".part" after it matches no queue until the rename.
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        try:
            with open(final + ".part", "wb") as file:
                file.write(dumps(payload).encode())
            os.replace(final + ".part", final)
        except OSError as exc:
            raise ChannelError(f"cannot add the message file {final!r}") from exc


class Transport(filesystem.Transport):
    Channel = Channel
