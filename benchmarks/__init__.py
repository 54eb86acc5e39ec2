"""Benchmarks of reliable_tasks against stock Celery, run by ``make bench``."""
