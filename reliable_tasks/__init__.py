"""reliable_tasks: Celery on RabbitMQ that loses nothing and does nothing twice."""

from __future__ import annotations

from .exceptions import (
    EnqueueError,
    ExecutionError,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    LeaseLost,
    PayloadNotSerializable,
    PayloadTooLarge,
    ReliableTasksError,
    UnsupportedOption,
)
from .task import ReliableTask, reliable_task

__all__ = [
    "EnqueueError",
    "ExecutionError",
    "IdempotencyKeyReused",
    "InvalidIdempotencyKey",
    "LeaseLost",
    "PayloadNotSerializable",
    "PayloadTooLarge",
    "ReliableTask",
    "ReliableTasksError",
    "UnsupportedOption",
    "reliable_task",
]
