"""The admin (dead tasks, the outbox, the shop's tables) and reliable_tasks' health/ and metrics/."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("", RedirectView.as_view(url="/admin/")),
    path("admin/", admin.site.urls),
    path("reliable-tasks/", include("reliable_tasks.urls")),
]
