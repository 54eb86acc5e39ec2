"""The dead-task admin in a real headless browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import django.contrib.admin
import pytest
from django.contrib.auth.models import Permission, User
from django.db import connections
from django.test import override_settings
from pytest_django.live_server_helper import LiveServer

from reliable_tasks.models import DeadStatus, DeadTask
from tests.support import ROOT, Broker, ProcessFactory, effects, make_dead_task, wait_for
from tests.testapp.tasks import charge, record, send_receipt

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

IN_CI = os.environ.get("CI") == "true"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ADMIN_STATIC = Path(django.contrib.admin.__file__).parent / "static"
SCREENSHOTS = Path(os.environ.get("RT_SCREENSHOT_DIR", "/tmp"))
PASSWORD = "correct horse battery staple"


def missing(what: str) -> None:
    """Skip on a laptop; in CI a missing browser is a failure."""
    if IN_CI:
        pytest.fail(f"{what}; CI must provide it")
    pytest.skip(what)


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed by scripts/ensure-browser when it is missing."""
    if not CHROMIUM.exists():
        try:
            subprocess.run([ROOT / "scripts" / "ensure-browser"], check=True, timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            missing(
                f"{CHROMIUM} is missing and scripts/ensure-browser could not install it ({exc})"
            )
    return CHROMIUM


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    """pytest-django's live server, started while STATIC_URL is set.

    The test project has no staticfiles app and no STATIC_URL, and the live server's static
    handler cannot start without one; the files themselves are served by ``page`` below.
    """
    with override_settings(STATIC_URL="/static/"):
        server = LiveServer("localhost")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(
    chromium: Path, live_server: LiveServer, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Page]:
    """A fresh browser page on the live server; admin CSS and JS served from Django's package."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    # Playwright's sync API runs an event loop in this thread, and Django refuses ORM calls
    # from a thread with a running loop; the test's own ORM calls are synchronous and safe.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    # The test project has no staticfiles app: the admin's CSS and JS come from Django's package.
    settings.STATIC_URL = "/static/"

    def serve_static(route: Route) -> None:
        relative = route.request.url.split("/static/", 1)[1].split("?", 1)[0]
        target = (ADMIN_STATIC / relative).resolve()
        if target.is_file() and ADMIN_STATIC in target.parents:
            route.fulfill(path=target)
        else:
            route.fulfill(status=404)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.route(re.compile(r".*/static/.*"), serve_static)
        tab = context.new_page()
        tab.set_default_timeout(15_000)
        try:
            yield tab
        finally:
            context.close()
            browser.close()
            # While Playwright's loop runs, Django keeps this thread's connections apart from
            # its usual ones (as for async code); close them here or they outlive the test.
            connections.close_all()


def log_in(page: Page, base: str, username: str) -> None:
    page.goto(f"{base}/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_selector("#user-tools")


def superuser(name: str = "ops") -> User:
    return User.objects.create_superuser(name, f"{name}@example.com", PASSWORD)


def open_dead_tasks(page: Page) -> None:
    page.get_by_role("link", name="Dead tasks").first.click()
    page.wait_for_selector("#rt-summary")


def listed_rows(page: Page) -> int:
    return page.locator("#result_list tbody tr").count()


def test_an_operator_filters_opens_and_requeues_a_dead_task_that_then_succeeds(
    page: Page,
    live_server: LiveServer,
    broker: Broker,
    processes: ProcessFactory,
    tmp_path: Path,
) -> None:
    superuser()
    make_dead_task(record, "receipt-18", reason="crash_loop", exc_type="", exc_message="")
    make_dead_task(
        charge, 9, reason="give_up", exc_type="tests.CardDeclined", exc_message="card declined"
    )
    # The cause: the mail gateway is down. A real relay and worker run the task until its
    # policy gives up (two attempts).
    cause = tmp_path / "gateway-down"
    cause.touch()
    env = {"RT_TEST_SIGNAL_DIR": str(tmp_path)}
    processes.relay(env=env)
    processes.worker(env=env)
    send_receipt.delay("receipt-17")
    wait_for(
        lambda: DeadTask.objects.filter(task_name=send_receipt.name).exists(),
        timeout=60,
        what="the task to become dead",
    )
    dead = DeadTask.objects.get(task_name=send_receipt.name)
    log_in(page, live_server.url, "ops")
    open_dead_tasks(page)
    assert page.locator("#rt-summary h2").inner_text() == "3 dead tasks waiting for a decision"
    assert listed_rows(page) == 3

    # Filter: the reason in the sidebar, then the task id in the search box.
    page.locator("#changelist-filter").get_by_role("link", name="retries exhausted").click()
    page.wait_for_url(re.compile(r"reason__exact=exhausted"))
    assert listed_rows(page) == 1
    page.fill("#searchbar", dead.task_id)
    page.press("#searchbar", "Enter")
    page.wait_for_url(re.compile(r"q=" + dead.task_id))
    assert listed_rows(page) == 1
    page.screenshot(path=SCREENSHOTS / "rt-admin-changelist.png", full_page=True)

    # Open it: the arguments, the error and every attempt's traceback.
    page.locator("#result_list tbody tr").first.locator("th a").click()
    page.wait_for_selector("#rt-attempts")
    assert '"receipt-17"' in page.locator("pre.rt-json").first.inner_text()
    assert page.locator(".rt-attempt").count() == 2
    assert "the mail gateway is down" in page.locator(".rt-traceback").last.inner_text()
    page.screenshot(path=SCREENSHOTS / "rt-admin-detail.png", full_page=True)

    # The cause is fixed (the gateway is back): requeue under the same key.
    cause.unlink()
    page.get_by_label("Keep the key", exact=False).check()
    page.locator("#rt-requeue-form input[type=submit]").click()
    page.wait_for_selector(".messagelist .success")
    assert "Requeued" in page.locator(".messagelist").inner_text()

    # The relay publishes it and the worker runs it.
    wait_for(lambda: effects("receipt-17"), timeout=60, what="the requeued task to run")
    assert effects() == ["receipt-17"]  # once, and nothing else ran
    dead.refresh_from_db()
    assert dead.status == DeadStatus.REQUEUED

    page.reload()
    status = page.locator(".field-status_line .readonly").inner_text()
    assert status.startswith("requeued since ")
    assert status.endswith(" by ops")
    assert page.locator("#rt-requeue-form").count() == 0

    # And the admin shows it succeeded: its outbox row dispatched, its key done.
    page.get_by_role("link", name=re.compile(r"outbox row \d+")).click()
    page.wait_for_selector(".field-status")
    assert page.locator(".field-status .readonly").first.inner_text() == "dispatched"
    page.goto(f"{live_server.url}/admin/reliable_tasks/idempotencykey/?q={dead.idempotency_key}")
    assert listed_rows(page) == 1
    assert "done" in page.locator("#result_list tbody tr").first.inner_text()
    page.screenshot(path=SCREENSHOTS / "rt-admin-key-done.png", full_page=True)

    # And the admin's history says who did what.
    page.goto(f"{live_server.url}/admin/reliable_tasks/deadtask/{dead.pk}/history/")
    assert "Requeued through the outbox as row" in page.locator("#change-history").inner_text()


def test_a_view_only_user_sees_dead_tasks_but_is_offered_no_action(
    page: Page, live_server: LiveServer
) -> None:
    viewer = User.objects.create_user("viewer", password=PASSWORD, is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_deadtask"))
    make_dead_task(record, "look-but-do-not-touch")
    log_in(page, live_server.url, "viewer")
    open_dead_tasks(page)
    assert listed_rows(page) == 1
    assert page.locator("select[name=action]").count() == 0
    assert page.locator("input.action-select").count() == 0
    assert page.locator("#rt-requeue-matching, #rt-discard-matching").count() == 0

    page.locator("#result_list tbody tr th a").first.click()
    page.wait_for_selector("#rt-attempts")
    assert "look-but-do-not-touch" in page.locator("pre.rt-json").first.inner_text()
    assert page.locator("#rt-actions").count() == 0
    assert page.locator("input[type=submit]").count() == 0  # no button at all
    assert page.get_by_role("link", name="Delete").count() == 0


def test_a_script_in_an_argument_or_an_error_renders_as_inert_text(
    page: Page, live_server: LiveServer
) -> None:
    superuser()
    make_dead_task(
        record,
        "<script>alert(1)</script>",
        exc_message="<img src=x onerror=alert(2)>",
        task_name="<script>alert(3)</script>",
    )
    dialogs: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    log_in(page, live_server.url, "ops")
    open_dead_tasks(page)
    assert page.get_by_text("<img src=x onerror=alert(2)>").first.is_visible()
    assert page.locator("#result_list img").count() == 0
    page.locator("#result_list tbody tr th a").first.click()
    page.wait_for_selector("#rt-attempts")
    args = page.locator(".field-args_json pre")
    assert args.inner_text() == '[\n  "<script>alert(1)</script>"\n]'
    assert args.is_visible()
    assert page.locator("script", has_text="alert(").count() == 0  # no element made of the text
    page.wait_for_timeout(500)  # time for any injected handler to fire
    assert dialogs == []


def test_requeue_all_matching_a_filter_takes_every_page_after_a_confirmation(
    page: Page, live_server: LiveServer
) -> None:
    superuser()
    template = make_dead_task(record, "storm")
    DeadTask.objects.bulk_create(
        [
            DeadTask(
                **{
                    f.name: getattr(template, f.name)
                    for f in DeadTask._meta.concrete_fields
                    if f.name not in ("id", "task_id")
                },
                task_id=f"storm-{n}",
            )
            for n in range(999)
        ]
    )
    make_dead_task(charge, 1)  # not in the filter
    log_in(page, live_server.url, "ops")
    open_dead_tasks(page)
    page.locator("#changelist-filter").get_by_role(
        "link", name="tests.testapp.tasks.record"
    ).click()
    page.wait_for_url(re.compile(r"task=tests.testapp.tasks.record"))
    assert listed_rows(page) == 100  # one page of ten
    page.click("#rt-requeue-matching")
    page.wait_for_selector("#rt-affected")
    page.screenshot(path=SCREENSHOTS / "rt-admin-bulk-confirmation.png", full_page=True)
    assert (
        page.locator("#rt-affected")
        .inner_text()
        .startswith("1000 dead tasks will be requeued through the outbox")
    )
    page.get_by_role("button", name="Yes, requeue 1000 dead tasks").click()
    page.wait_for_selector(".messagelist .success")
    assert (
        "Requeued 1,000 dead tasks through the outbox." in page.locator(".messagelist").inner_text()
    )
    assert DeadTask.objects.filter(status=DeadStatus.REQUEUED).count() == 1000
    assert DeadTask.objects.get(status=DeadStatus.DEAD).task_name == charge.name
