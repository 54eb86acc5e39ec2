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
    Retry,
    UnsupportedOption,
)
from .retry import RetryPolicy
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
    "Retry",
    "RetryPolicy",
    "UnsupportedOption",
    "reliable_task",
]
