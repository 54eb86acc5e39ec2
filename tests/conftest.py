"""Fixtures shared by all test folders: the real services, and processes the tests start."""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, Task

from reliable_tasks import outbox
from reliable_tasks.relay import Relay
from tests.support import ROOT, Broker, ProcessFactory, rabbitmqctl, service_reachable

IN_CI = os.environ.get("CI") == "true"
OUTAGE_LOCK = Path("/tmp/rt-rabbitmq.lock")


def require(service: str, port: int) -> None:
    """Skip when a service is missing on a laptop; fail in CI, where it must be there."""
    if service_reachable(port):
        return
    message = f"{service} is not reachable on 127.0.0.1:{port}"
    if IN_CI:
        pytest.fail(f"{message}; CI must start it (.ci/run)")
    pytest.skip(message)


@pytest.fixture
def rabbitmq() -> None:
    require("RabbitMQ", 5672)


@pytest.fixture
def redis_service() -> None:
    require("Redis", 6379)


@pytest.fixture(autouse=True)
def _database_service(request: pytest.FixtureRequest) -> None:
    from django.conf import settings

    if settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        require("PostgreSQL", 5432)


@pytest.fixture(autouse=True)
def _forget_done_keys() -> None:
    """The database is flushed between tests; the cache of done keys must be too."""
    if service_reachable(6379):
        from django.core.cache import cache

        cache.clear()


@pytest.fixture
def broker(rabbitmq: None) -> Iterator[Broker]:
    """The test session's queues on the local RabbitMQ, purged before the test."""
    b = Broker()
    b.purge()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def relay(broker: Broker) -> Iterator[Relay]:
    """An in-process relay on the test database and the local RabbitMQ."""
    with Relay() as r:
        yield r


@pytest.fixture
def service_outage() -> Iterator[None]:
    """For a test that stops RabbitMQ or Redis: one outage on this machine at a time (other
    runs, the demo and the chaos suite take the same lock), and every service up again after.
    """
    with OUTAGE_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            rabbitmqctl("start_app")
            rabbitmqctl("await_startup")
            subprocess.run(
                [str(ROOT / "scripts" / "ensure-services")],
                check=True,
                capture_output=True,
                timeout=300,
            )


@pytest.fixture
def processes(request: pytest.FixtureRequest) -> Iterator[ProcessFactory]:
    """Starts relays and workers as subprocesses on the test database; kills them after."""
    factory = ProcessFactory(test_name=request.node.name)
    try:
        yield factory
    finally:
        factory.stop_all()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if service_reachable(5672):
        with contextlib.suppress(OSError):
            Broker().delete_all()


@pytest.fixture
def celery_sends(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The task names Celery's ``send_task`` is called with during the test.

    Celery's ``apply_async`` and ``send_task`` are used as Celery defines them: a tracing
    integration that wrapped them in an earlier test (sentry-sdk's) is set aside here.
    """
    monkeypatch.setattr(Task, "apply_async", inspect.unwrap(Task.apply_async))
    monkeypatch.setattr(Celery, "send_task", inspect.unwrap(Celery.send_task))
    outbox.forget_templates()  # those of earlier tests
    from tests.celery_app import app

    original = app.send_task
    sent: list[str] = []

    def counting(name: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(app, "send_task", counting)
    return sent
