"""Sentry integration: dead tasks as events with stable fingerprints, retries as breadcrumbs."""

from __future__ import annotations


def connect() -> None:
    """Connect the signal handlers when sentry-sdk is installed."""
