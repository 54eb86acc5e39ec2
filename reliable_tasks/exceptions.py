"""The package's errors: one base class and a shallow tree under it."""

from __future__ import annotations


class ReliableTasksError(Exception):
    """Base class of every error reliable_tasks raises."""


class EnqueueError(ReliableTasksError, ValueError):
    """A task could not be written to the outbox; nothing was written."""


class PayloadNotSerializable(EnqueueError):
    """An argument cannot be encoded as JSON."""


class PayloadTooLarge(EnqueueError):
    """The encoded task is above ``RELIABLE_TASKS_MAX_PAYLOAD_BYTES``."""


class UnsupportedOption(EnqueueError):
    """An ``apply_async`` option that the outbox cannot honour."""


class InvalidIdempotencyKey(EnqueueError):
    """A task's ``idempotency_key`` callable failed or returned something unusable."""


class ExecutionError(ReliableTasksError):
    """A delivery was refused by the execution ledger; the task did not run."""


class IdempotencyKeyReused(ExecutionError):
    """A key that was first used with other arguments came back with different ones."""


class LeaseLost(ExecutionError):
    """A lease-mode task lost its key: the lease expired and another execution took over."""
