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


class Retry(ReliableTasksError):
    """Raise from a task to ask for another attempt after ``delay`` seconds, without an error.

    For a ``Retry-After`` answer: ``raise Retry(delay=30)``; with ``delay=None`` the retry
    policy's backoff decides. The attempt still counts against the policy's ``max_attempts``
    and ``deadline``. ``cause`` is the error that led to it, recorded with the attempt.
    """

    def __init__(
        self, delay: float | None, reason: str = "", cause: BaseException | None = None
    ) -> None:
        if delay is not None and delay < 0:
            raise ValueError(f"delay is a number of seconds >= 0, got {delay}")
        self.delay = None if delay is None else float(delay)
        self.reason = reason
        self.cause = cause
        when = "after the policy's backoff" if delay is None else f"in {delay:g} s"
        super().__init__(
            reason or (f"retry requested {when}: {cause!r}" if cause else f"retry requested {when}")
        )
