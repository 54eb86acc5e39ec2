"""The chaos suite: many tasks through the outbox while processes and services are made to fail.

``make chaos`` (``python -m tests.chaos``) enqueues 10,000 tasks with two relays and three
worker processes on PostgreSQL, RabbitMQ and Redis, while a seeded fault injector SIGKILLs
workers and relays, restarts RabbitMQ, stops Redis and publishes raw duplicates of messages
that already ran. At the end it checks from the database that every task's effect happened
exactly once, that the poison tasks are dead for the right reason, that the outbox drained
and that no lease is left held, and prints a table. ``--small`` is the run inside
``make test`` (``tests/e2e/test_chaos.py``).

- ``plan.py``: the workload and the fault schedule, both drawn from the seed (no I/O).
- ``fleet.py``: the relay and worker processes, and the services the faults stop.
- ``run.py``: the run itself, the checks and the table.
"""
