"""The one settings object: every ``RELIABLE_TASKS_*`` setting, read on first access.

Reading on access (not at import), and forgetting a value when ``override_settings`` changes
it, keeps tests working.
No other module of the package touches ``django.conf.settings``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from .retry import RetryPolicy

KiB = 1024


@dataclass(frozen=True)
class Setting:
    """One setting: its default and the types it accepts."""

    default: Any
    types: tuple[type, ...]
    doc: str
    #: The smallest number accepted, for numeric settings that check it.
    minimum: float | None = None


SETTINGS: dict[str, Setting] = {
    "DATABASE": Setting(
        "default", (str,), "Database alias that holds the outbox, ledger and dead tasks."
    ),
    "MAX_PAYLOAD_BYTES": Setting(
        256 * KiB,
        (int,),
        "Largest encoded task (body and headers) accepted at enqueue.",
        minimum=1,
    ),
    "OUTBOX_RETENTION": Setting(
        timedelta(days=7),
        (timedelta,),
        "How long dispatched outbox rows are kept as an audit trail.",
    ),
    "RELAY_BATCH_SIZE": Setting(
        1000,
        (int,),
        "Rows a relay claims, publishes and confirms per batch.",
        minimum=1,
    ),
    "RELAY_POLL_INTERVAL": Setting(
        1.0,
        (int, float),
        "Seconds a relay sleeps when it was not woken (polling fallback).",
        minimum=0.01,
    ),
    "RELAY_CONFIRM_TIMEOUT": Setting(
        30.0,
        (int, float),
        "Seconds a relay waits for the broker's confirms of one batch.",
        minimum=0.1,
    ),
    "RELAY_HEARTBEAT_INTERVAL": Setting(
        5.0,
        (int, float),
        "Seconds between two heartbeats of a relay.",
        minimum=0.1,
    ),
    "RELAY_PRUNE_INTERVAL": Setting(
        60.0,
        (int, float),
        "Seconds between two pruning passes of a relay; 0 turns them off.",
        minimum=0,
    ),
    "RELAY_RECONNECT_BACKOFF": Setting(
        (0.5, 30.0),
        (tuple, list),
        "(base, cap) in seconds of the relay's jittered reconnect backoff.",
    ),
    "RELAY_PUBLISH_RETRY_BACKOFF": Setting(
        (1.0, 300.0),
        (tuple, list),
        "(base, cap) in seconds before a refused or returned message is published again.",
    ),
    "RELAY_IN_WORKER": Setting(
        False, (bool,), "Run a relay thread inside each Celery worker (small deployments)."
    ),
    "IDEMPOTENCY_RETENTION": Setting(
        timedelta(days=7),
        (timedelta,),
        "How long a completed idempotency key keeps refusing to run again.",
    ),
    "LEASE_SECONDS": Setting(
        300.0,
        (int, float),
        "Lease of a lease-mode key; a holder that stops renewing loses it after this.",
        minimum=1,
    ),
    "MAX_RESULT_BYTES": Setting(
        64 * KiB,
        (int,),
        "Largest task result the ledger stores for duplicates; larger results are stored as null.",
        minimum=0,
    ),
    "CACHE_ALIAS": Setting(
        "default",
        (str, type(None)),
        "Django cache that remembers completed keys and marks executions in progress (a fast "
        "path, never the truth); None turns it off.",
    ),
    "RETRY_POLICY": Setting(
        None,
        (dict, RetryPolicy, type(None)),
        "Default RetryPolicy of reliable tasks (a RetryPolicy or its keyword arguments); None: RetryPolicy().",
    ),
    "MAX_DELIVERIES": Setting(
        5,
        (int,),
        "Deliveries of one message without an outcome (worker killed) before it becomes a dead task.",
        minimum=1,
    ),
    "DATABASE_DOWN_HOLD": Setting(
        60.0,
        (int, float),
        "Seconds a worker holds a message whose execution found the database (or, for a "
        "duplicate of a chord's member, the result backend) unreachable, checking every second, "
        "before it puts the message back; it goes back, or on, at once when it answers. 0: put "
        "back after one second.",
        minimum=0,
    ),
    "MAX_RECORDED_ATTEMPTS": Setting(
        25,
        (int,),
        "Failed attempts kept per task id; older ones are dropped.",
        minimum=1,
    ),
    "DEAD_TASK_RETENTION": Setting(
        timedelta(days=30),
        (timedelta,),
        "How long requeued or discarded dead tasks are kept; dead ones are kept until acted on.",
    ),
    "HEALTH_RELAY_MAX_SILENCE": Setting(
        60.0,
        (int, float),
        "health/ fails when no running relay has sent a heartbeat for this many seconds.",
        minimum=0,
    ),
    "HEALTH_MAX_DUE_AGE": Setting(
        60.0,
        (int, float),
        "health/ fails when the oldest due outbox row has waited longer than this, in seconds, "
        "or a pending row has been refused by the broker for longer than this.",
        minimum=0,
    ),
    "PRUNE_BATCH_SIZE": Setting(
        1000, (int,), "Rows deleted per statement when pruning.", minimum=1
    ),
    "CELERY_APP": Setting(
        None,
        (str, type(None)),
        "Dotted path 'module:attribute' of the Celery app; default: Celery's current app.",
    ),
}


class Settings:
    """``RELIABLE_TASKS_<NAME>`` settings with typed defaults.

    A value is checked on its first read and remembered; Django's ``setting_changed`` signal
    (sent by ``override_settings``) forgets it, so tests see their overrides.
    """

    def __init__(self) -> None:
        self._checked: dict[str, Any] = {}
        setting_changed.connect(self._changed, weak=False, dispatch_uid="reliable-tasks-conf")

    def _changed(self, setting: str = "", **kwargs: Any) -> None:
        if setting.startswith("RELIABLE_TASKS_"):
            self._checked.pop(setting.removeprefix("RELIABLE_TASKS_"), None)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._checked[name]
        except KeyError:
            pass
        value = self._read(name)
        self._checked[name] = value
        return value

    def _read(self, name: str) -> Any:
        try:
            spec = SETTINGS[name]
        except KeyError:
            raise AttributeError(f"reliable_tasks has no setting {name!r}") from None
        value = getattr(django_settings, f"RELIABLE_TASKS_{name}", spec.default)
        # bool is an int subclass; a True batch size is a mistake worth naming.
        if not isinstance(value, spec.types) or (
            isinstance(value, bool) and bool not in spec.types
        ):
            expected = " or ".join(t.__name__ for t in spec.types)
            raise ImproperlyConfigured(
                f"RELIABLE_TASKS_{name} must be {expected}, not {type(value).__name__} "
                f"({value!r}). {spec.doc} Default: {spec.default!r}."
            )
        if (
            spec.minimum is not None
            and isinstance(value, int | float)
            and not (math.isfinite(value) and value >= spec.minimum)
        ):
            raise ImproperlyConfigured(
                f"RELIABLE_TASKS_{name} must be a finite number of at least {spec.minimum:g}, "
                f"not {value!r}. {spec.doc} Default: {spec.default!r}."
            )
        return value

    def retry_policy(self) -> RetryPolicy:
        """The project's default retry policy."""
        value = self.RETRY_POLICY
        if value is None:
            return RetryPolicy()
        if isinstance(value, RetryPolicy):
            return value
        try:
            return RetryPolicy(**value)
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(
                f"RELIABLE_TASKS_RETRY_POLICY is not a valid RetryPolicy: {exc}"
            ) from exc

    def backoff_pair(self, name: str) -> tuple[float, float]:
        """Read a ``(base, cap)`` setting and check its shape."""
        value = getattr(self, name)
        if (
            len(value) != 2
            or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value
            )
            or value[0] > value[1]
        ):
            raise ImproperlyConfigured(
                f"RELIABLE_TASKS_{name} must be (base, cap) in seconds, two positive numbers with "
                f"base <= cap; got {value!r}."
            )
        return float(value[0]), float(value[1])

    # -- for the system checks: what the project configured, read here like every setting --

    def configured_names(self) -> list[str]:
        """Names (without the prefix) of the ``RELIABLE_TASKS_*`` settings the project sets."""
        prefix = "RELIABLE_TASKS_"
        return sorted(n.removeprefix(prefix) for n in dir(django_settings) if n.startswith(prefix))

    def database_engine(self, alias: str) -> str | None:
        """The ``ENGINE`` of a ``DATABASES`` alias, or None when the alias is not configured."""
        database = django_settings.DATABASES.get(alias)
        return None if database is None else str(database.get("ENGINE", ""))

    def cache_aliases(self) -> list[str]:
        """The aliases configured in ``CACHES``."""
        return sorted(django_settings.CACHES)

    def cache_settings(self, alias: str) -> dict[str, Any]:
        """The ``CACHES`` entry of ``alias``."""
        return dict(django_settings.CACHES[alias])


conf = Settings()
