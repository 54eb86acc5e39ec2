"""Options under which a reliable task could be lost are refused when it is declared."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from reliable_tasks import reliable_task
from tests.testapp.tasks import record


@pytest.mark.parametrize(
    ("option", "value"),
    [("acks_late", False), ("reject_on_worker_lost", False), ("acks_on_timeout", True)],
)
def test_an_option_that_would_lose_the_task_is_refused_by_name(option: str, value: Any) -> None:
    def work() -> None:
        pass

    with pytest.raises(ImproperlyConfigured, match=f"sets {option}={value}"):
        reliable_task(name=f"tests.refused.{option}", **{option: value})(work)


def test_a_reliable_task_goes_back_to_the_queue_when_its_process_dies_or_times_out() -> None:
    assert (record.acks_late, record.reject_on_worker_lost, record.acks_on_timeout) == (
        True,
        True,
        False,
    )
