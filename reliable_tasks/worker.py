"""A Celery worker bootstep that hosts a relay thread, for small deployments.

Add it in your Celery module, beside the app::

    from reliable_tasks.worker import RelayStep

    app.steps["worker"].add(RelayStep)

and set ``RELIABLE_TASKS_RELAY_IN_WORKER = True``. Each worker then runs one relay thread;
on PostgreSQL several such relays share the outbox safely. This module imports no models,
so the Celery module may import it before Django is set up.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from celery import bootsteps

if TYPE_CHECKING:
    from .relay import Relay

logger = logging.getLogger("reliable_tasks.worker")


class RelayStep(bootsteps.StartStopStep):
    """Runs ``Relay.run()`` in a thread for the worker's lifetime when the setting says so."""

    label = "reliable_tasks relay"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.relay: Relay | None = None
        self.thread: threading.Thread | None = None

    def include_if(self, worker: Any) -> bool:
        from .conf import conf

        return bool(conf.RELAY_IN_WORKER)

    def start(self, worker: Any) -> None:
        from .relay import Relay

        self.relay = Relay(app=worker.app, name=f"{worker.hostname}:relay")
        self.thread = threading.Thread(target=self._run, name="reliable_tasks-relay", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from django.db import connections

        assert self.relay is not None
        try:
            self.relay.run()
        except Exception:
            logger.exception(
                "the relay thread of this worker died; committed tasks wait for another relay"
            )
        finally:
            connections.close_all()

    def stop(self, worker: Any) -> None:
        if self.relay is not None:
            self.relay.stop()
        if self.thread is not None:
            self.thread.join(timeout=30)

    shutdown = stop
