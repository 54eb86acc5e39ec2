"""A plain call's argument display (``argsrepr`` / ``kwargsrepr``) is Celery's, to the character."""

from __future__ import annotations

from typing import Any

from celery.utils.saferepr import saferepr
from hypothesis import example, given
from hypothesis import strategies as st

from reliable_tasks.outbox import display

scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too
    | st.floats()  # nan and the infinities too
    | st.text(max_size=8)
)
arguments = st.lists(scalars, max_size=40) | st.lists(scalars, max_size=40).map(tuple)
keyword_arguments = st.dictionaries(st.text(max_size=8), scalars, max_size=5)
maxsizes = st.none() | st.sampled_from([0, 1, 4, 16, 64, 1024])


@given(value=arguments | keyword_arguments, maxsize=maxsizes)
@example(value=(), maxsize=1024)
@example(value={}, maxsize=1024)
@example(value=(3,), maxsize=1024)
@example(value=(2**70, -1, True, None, float("nan")), maxsize=1024)
@example(value=tuple(range(1000)), maxsize=1024)  # longer than the display: cut as Celery cuts
@example(value=[10**30] * 3, maxsize=16)
def test_the_display_of_arguments_is_what_celery_writes(value: Any, maxsize: int | None) -> None:
    assert display(value, maxsize, 3) == saferepr(value, maxsize, maxlevels=3)
