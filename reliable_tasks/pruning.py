"""Deleting what is past its retention in batches: the outbox, the ledger and dead tasks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from django.db import transaction
from django.db.models import QuerySet


def delete_batch(
    expired: Iterable[QuerySet[Any]],
    limit: int,
    *,
    dependents: Callable[[list[Any]], None] | None = None,
) -> int:
    """Delete up to ``limit`` rows of the ``expired`` queries, one after the other, each in its
    own order; return how many. Each batch is one ``DELETE`` per query, of the rows read for it
    that still qualify, so a large backlog never becomes one long statement. ``dependents(ids)``
    deletes what belongs to the rows about to go (in the same transaction)."""
    deleted = 0
    for rows in expired:
        if deleted >= limit:
            break
        ids = list(rows.values_list("pk", flat=True)[: limit - deleted])
        if ids:
            with transaction.atomic(using=rows.db):
                if dependents is not None:
                    dependents(ids)
                # With the query's own conditions: a row that stopped qualifying since it was
                # read (a lease taken over, a dead task requeued) stays.
                deleted += rows.filter(pk__in=ids).delete()[0]
    return deleted


def count(expired: Iterable[QuerySet[Any]]) -> int:
    """How many rows ``delete_batch`` would delete in all, over every batch."""
    return sum(rows.count() for rows in expired)
