"""Health: does the pipeline deliver? The answer health/ gives, with its reasons."""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db import DatabaseError

from .conf import conf
from .metrics import Snapshot, snapshot


@dataclass(frozen=True)
class Health:
    """``ok`` with no reasons, or not ok with each reason in words an operator can act on."""

    ok: bool
    reasons: list[str] = field(default_factory=list)
    snapshot: Snapshot | None = None


def check() -> Health:
    """Judge the pipeline: database reachable, a relay alive, the backlog not too old, no row
    refused by the broker for too long."""
    try:
        snap = snapshot()
    except DatabaseError as exc:
        return Health(
            ok=False,
            reasons=[f"database unreachable ({type(exc).__name__}): the outbox cannot be read"],
        )
    reasons: list[str] = []
    silence = float(conf.HEALTH_RELAY_MAX_SILENCE)
    alive = [r for r in snap.relays if not r.stopped and r.seconds_since_seen <= silence]
    if not alive:
        running = [r for r in snap.relays if not r.stopped]
        last = min((r.seconds_since_seen for r in running), default=None)
        if last is not None:
            seen = f"; the last was seen {last:.0f} s ago"
        elif snap.relays:
            seen = "; every relay recorded has stopped"
        else:
            seen = "; none has ever run here"
        reasons.append(
            f"no relay heartbeat in the last {silence:g} s{seen}: start `manage.py reliable_tasks relay`"
        )
    age = snap.oldest_due_age_seconds
    limit = float(conf.HEALTH_MAX_DUE_AGE)
    if age is not None and age > limit:
        reasons.append(
            f"the oldest due outbox row has waited {age:.0f} s (more than {limit:g} s): "
            f"{snap.outbox_due} rows are due; is the broker reachable from the relay?"
        )
    failing = snap.oldest_failing_age_seconds
    if failing is not None and failing > limit:
        rows = (
            "1 outbox row fails"
            if snap.outbox_failing == 1
            else f"{snap.outbox_failing} outbox rows fail"
        )
        reasons.append(
            f"{rows} to publish; the broker has refused one for {failing:.0f} s (more than "
            f"{limit:g} s) and the relay keeps setting it aside for a later try: see the last "
            "error of pending rows in the outbox admin, or the relay's 'not published' log lines"
        )
    return Health(ok=not reasons, reasons=reasons, snapshot=snap)
