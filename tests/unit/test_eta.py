"""The eta header of a reliable task's countdown, as Celery's own message build writes it."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from reliable_tasks.outbox import eta_header
from tests.celery_app import app

PARIS = ZoneInfo("Europe/Paris")


@pytest.mark.parametrize(
    ("now", "countdown", "expected"),
    [
        # Two hours across the spring change of the clocks (02:00 becomes 03:00).
        (dt.datetime(2026, 3, 29, 1, 30, tzinfo=PARIS), 7200, "2026-03-29T04:30:00+02:00"),
        # One hour across the autumn change (03:00 becomes 02:00 again).
        (dt.datetime(2026, 10, 25, 2, 30, tzinfo=PARIS), 3600, "2026-10-25T02:30:00+01:00"),
        (dt.datetime(2026, 6, 1, 12, 0, tzinfo=PARIS), 90, "2026-06-01T12:01:30+02:00"),
    ],
)
def test_a_countdown_counts_elapsed_seconds_in_the_apps_time_zone(
    monkeypatch: pytest.MonkeyPatch, now: dt.datetime, countdown: int, expected: str
) -> None:
    monkeypatch.setattr(app, "now", lambda: now)
    monkeypatch.setattr(app, "timezone", PARIS)
    assert eta_header(app, countdown=countdown) == expected


def test_an_eta_is_written_as_given_and_a_countdown_wins_over_it() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert eta_header(app, eta=when) == "2026-01-02T03:04:05+00:00"
    assert eta_header(app, eta="2026-01-02T03:04:05") == "2026-01-02T03:04:05"
    assert eta_header(app) is None
    assert eta_header(app, countdown=0) is None  # no countdown, as in Celery
    with_both = eta_header(app, countdown=60, eta=when)
    assert with_both is not None
    assert dt.datetime.fromisoformat(with_both) > dt.datetime.now(dt.UTC)
