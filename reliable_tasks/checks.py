"""System checks (``python manage.py check``): configurations that would lose or repeat work."""

from __future__ import annotations
