"""Signals reliable_tasks sends, for metrics and for your own hooks.

Every signal's sender is the task's class; ``task`` is the task instance.
"""

from __future__ import annotations

from django.dispatch import Signal

#: A delivery found its key done and returned the stored result. Args: task, key, cached
#: (True when the cache answered, False when the database did), result.
task_duplicate = Signal()

#: A delivery found its key held by a live lease and was put off. Args: task, key, delay.
task_deferred = Signal()
