"""``path("reliable-tasks/", include("reliable_tasks.urls"))`` gives health/ and metrics/."""

from __future__ import annotations

from django.urls import path

from . import views

app_name = "reliable_tasks"

urlpatterns = [
    path("health/", views.health, name="health"),
    path("metrics/", views.metrics, name="metrics"),
]
