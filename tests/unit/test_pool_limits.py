"""The database-down hold ends before a time limit only where the worker's pool enforces it.

The solo pool's rule is proven end to end (tests/e2e/test_poison_and_retries.py); these check
that every pool Celery names is recognised, by its alias and by its class, so that a pool
module moved or renamed in Celery shows here instead of as a hold cut short in production.
"""

from __future__ import annotations

import pytest
from celery.concurrency import get_implementation

from reliable_tasks.task import _pool_limits

# (hard, soft): prefork's parent kills or signals its children; gevent runs each task under a
# gevent Timeout (the hard limit only); eventlet, threads and solo enforce neither.
ENFORCED = [
    ("prefork", (True, True)),
    ("processes", (True, True)),
    ("gevent", (True, False)),
    ("eventlet", (False, False)),
    ("threads", (False, False)),
    ("solo", (False, False)),
]


@pytest.mark.parametrize(("pool", "enforced"), ENFORCED)
def test_each_celery_pool_is_known_by_its_alias_and_by_its_class(
    pool: str, enforced: tuple[bool, bool]
) -> None:
    assert _pool_limits(pool) == enforced
    assert _pool_limits(get_implementation(pool)) == enforced


@pytest.mark.parametrize("pool", ["tests.no_such_module:TaskPool", "celery.app.task:Task"])
def test_a_pool_not_known_is_taken_to_enforce_both_limits(pool: str) -> None:
    """The safe side: the hold then ends before a limit that may never come, and the message
    goes back to the queue, instead of being killed by one in the middle of the hold."""
    assert _pool_limits(pool) == (True, True)
