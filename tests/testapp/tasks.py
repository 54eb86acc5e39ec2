"""Tasks the tests enqueue; each execution leaves one Effect row."""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task

from reliable_tasks import ReliableTask, reliable_task

from .models import Effect


@reliable_task(bind=True)
def record(self: ReliableTask, key: str, payload: Any = None) -> str:
    Effect.objects.create(key=key, task_id=self.request.id, payload=payload)
    return key


@shared_task(base=ReliableTask, bind=True)
def routed(self: ReliableTask, key: str) -> str:
    Effect.objects.create(key=key, task_id=self.request.id)
    return key


@reliable_task
def slow(key: str, seconds: float) -> str:
    time.sleep(seconds)
    Effect.objects.create(key=key)
    return key


@shared_task(bind=True, acks_late=True)
def plain_record(self: Any, key: str) -> str:
    Effect.objects.create(key=key, task_id=self.request.id)
    return key
