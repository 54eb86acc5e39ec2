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
