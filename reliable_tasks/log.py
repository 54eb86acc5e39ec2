"""One log form for relays and workers: ``task=… id=… key=… attempt=… | message``.

Every line about a task starts with the same fields, so one grep for a task id (or an
idempotency key) follows it through its attempts, retries, deferrals, duplicates, publish
failures and its death or requeue. (Enqueue and a successful publish log nothing: they are
the hot path, and the outbox row records them.)
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any


class Fields(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each message with ``name=value`` fields (empty ones left out)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        fields = " ".join(f"{k}={v}" for k, v in (self.extra or {}).items() if v not in (None, ""))
        return f"{fields} | {msg}", kwargs


def for_task(logger: logging.Logger, task: Any, key: str | None = None) -> Fields:
    """The fields of the execution in progress of ``task``."""
    request = task.request
    return Fields(
        logger,
        {
            "task": task.name,
            "id": request.id,
            "key": key or getattr(request, "idempotency_key", None),
            "attempt": int(request.retries or 0) + 1,
        },
    )


def with_fields(logger: logging.Logger, **fields: Any) -> Fields:
    return Fields(logger, fields)
