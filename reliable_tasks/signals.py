"""Signals reliable_tasks sends, for metrics and for your own hooks.

Task signals are sent by the task's class (``task`` is the instance); dead-task signals by
``DeadTask``.
"""

from __future__ import annotations

from django.dispatch import Signal

#: A delivery found its key done and returned the stored result. Args: task, key, cached
#: (True when the cache answered, False when the database did), result.
task_duplicate = Signal()

#: A delivery found its key held by a live lease and was put off. Args: task, key, delay.
task_deferred = Signal()

#: A failed attempt was recorded and the next one scheduled through the outbox.
#: Args: task, task_id, attempt (the number that failed), delay, exc.
task_retried = Signal()

#: A task became a dead task (sent once its transaction committed). Args: dead_task, exc (the
#: last attempt's exception, or None for a message that never became a task call).
task_dead = Signal()

#: A dead task was sent again through the outbox. Args: dead_task, outbox_id, user.
task_requeued = Signal()
