"""System checks: each id fires on the misconfiguration it names and stays quiet on the fix.

None of these tests may use the database (pytest-django refuses queries without the
django_db mark): a check that queried it would fail here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.core import mail
from django.core.checks import CheckMessage, run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.test import override_settings
from kombu import Exchange, Queue

from reliable_tasks.checks import TAG
from reliable_tasks.conf import conf
from tests.celery_app import app
from tests.support import ROOT

RECORD = "tests.testapp.tasks.record"
TRANSIENT = "rt-checks.transient"

CeleryConf = Callable[..., None]


def messages() -> list[CheckMessage]:
    return run_checks(tags=[TAG])


def ids() -> list[str]:
    return [message.id or "" for message in messages()]


def only(check_id: str) -> CheckMessage:
    """The one message with this id; fails if there are none or several."""
    found = [message for message in messages() if message.id == check_id]
    assert len(found) == 1, f"expected one {check_id}, got {found}"
    return found[0]


@pytest.fixture
def celery_conf() -> Iterator[CeleryConf]:
    """Changes the test Celery app's configuration for one test and puts it back after."""
    saved: dict[str, Any] = {}

    def change(**values: Any) -> None:
        for key, value in values.items():
            saved.setdefault(key, app.conf[key])
            app.conf[key] = value

    try:
        yield change
    finally:
        for key, value in saved.items():
            app.conf[key] = value


@pytest.fixture
def reliable_record() -> Any:
    """The registered instance of the reliable task ``record``."""
    import tests.testapp.tasks  # noqa: F401 - registers the task, as a worker's start does

    return app.tasks[RECORD]


@contextmanager
def outbox_database(engine: str) -> Iterator[None]:
    """An extra DATABASES alias with this engine, used as the outbox database."""
    databases = {**settings.DATABASES, "outbox": {"ENGINE": engine, "NAME": "rt-checks"}}
    override = override_settings(DATABASES=databases, RELIABLE_TASKS_DATABASE="outbox")
    # Django warns that overriding DATABASES leaves open connections as they were; the checks
    # read the setting only, and nothing here connects.
    with pytest.warns(UserWarning, match="Overriding setting DATABASES"):
        override.enable()
    try:
        yield
    finally:
        override.disable()


# -- the test project itself --------------------------------------------------------------------


def test_the_test_project_passes_its_own_checks() -> None:
    assert messages() == []


# ``manage.py check`` runs the database checks too on Django 6 (on 5.2 only with --database).
@pytest.mark.django_db
def test_manage_py_check_passes_on_the_test_settings_even_at_warning_level() -> None:
    call_command("check", fail_level="WARNING", verbosity=0)


def test_checks_read_configuration_only_so_they_run_with_the_broker_unreachable(
    celery_conf: CeleryConf, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CELERY_BROKER_WRITE_URL", raising=False)
    # Nothing listens on port 1: a check that connected would fail or hang here.
    celery_conf(broker_write_url="amqp://guest:guest@127.0.0.1:1//", broker_transport_options={})
    assert ids() == ["reliable_tasks.W004"]


# -- E001, W001: the settings themselves --------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["OUTBOX_RETENTION", "IDEMPOTENCY_RETENTION", "DEAD_TASK_RETENTION"]
)
def test_a_retention_that_is_no_timedelta_is_error_e001(name: str) -> None:
    with override_settings(**{f"RELIABLE_TASKS_{name}": 7}):
        error = only("reliable_tasks.E001")
    assert f"RELIABLE_TASKS_{name} must be timedelta, not int" in error.msg
    assert "remove it to use the default" in (error.hint or "")
    with override_settings(**{f"RELIABLE_TASKS_{name}": timedelta(days=3)}):
        assert messages() == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RELAY_BATCH_SIZE", "500"),
        ("RELAY_BATCH_SIZE", True),
        ("CACHE_ALIAS", 1),
        ("RELAY_RECONNECT_BACKOFF", (30.0, 0.5)),
        ("RELAY_PUBLISH_RETRY_BACKOFF", (1.0,)),
        ("RETRY_POLICY", {"max_attempts": 0}),
        ("RETRY_POLICY", {"attempts": 3}),
        ("DATABASE_DOWN_HOLD", -1),
        ("DATABASE_DOWN_HOLD", "60"),
        ("DATABASE_DOWN_HOLD", float("nan")),
        ("DATABASE_DOWN_HOLD", float("inf")),
        # A relay that claims no row a batch publishes nothing, forever, without a word.
        ("RELAY_BATCH_SIZE", 0),
        ("RELAY_BATCH_SIZE", -5),
        ("PRUNE_BATCH_SIZE", 0),
        ("MAX_DELIVERIES", 0),
        ("MAX_RECORDED_ATTEMPTS", 0),
        ("MAX_PAYLOAD_BYTES", 0),
        ("RELAY_POLL_INTERVAL", 0),
        ("RELAY_CONFIRM_TIMEOUT", 0),
        ("RELAY_HEARTBEAT_INTERVAL", float("nan")),
        ("LEASE_SECONDS", 0.5),
        ("RELAY_PRUNE_INTERVAL", -1),
        ("HEALTH_MAX_DUE_AGE", -1),
    ],
)
def test_any_setting_conf_refuses_is_error_e001_naming_it(name: str, value: Any) -> None:
    with override_settings(**{f"RELIABLE_TASKS_{name}": value}):
        error = only("reliable_tasks.E001")
    assert f"RELIABLE_TASKS_{name}" in error.msg


def test_a_setting_below_its_minimum_is_refused_with_the_minimum_named() -> None:
    with override_settings(RELIABLE_TASKS_DATABASE_DOWN_HOLD=-0.5):
        error = only("reliable_tasks.E001")
        with pytest.raises(
            ImproperlyConfigured, match=re.escape("a finite number of at least 0, not -0.5")
        ):
            _ = conf.DATABASE_DOWN_HOLD
    assert (
        "RELIABLE_TASKS_DATABASE_DOWN_HOLD must be a finite number of at least 0, not -0.5"
        in error.msg
    )
    with override_settings(RELIABLE_TASKS_DATABASE_DOWN_HOLD=0):
        assert conf.DATABASE_DOWN_HOLD == 0


def test_each_bad_setting_gets_its_own_e001() -> None:
    with override_settings(RELIABLE_TASKS_OUTBOX_RETENTION=7, RELIABLE_TASKS_LEASE_SECONDS="300"):
        assert ids() == ["reliable_tasks.E001", "reliable_tasks.E001"]


def test_a_misspelt_setting_is_warning_w001_with_the_likely_name() -> None:
    with override_settings(RELIABLE_TASKS_RELAY_BATCHSIZE=100):
        warning = only("reliable_tasks.W001")
    assert "RELIABLE_TASKS_RELAY_BATCHSIZE is not a reliable_tasks setting" in warning.msg
    hint = warning.hint or ""
    assert "Did you mean RELIABLE_TASKS_RELAY_BATCH_SIZE?" in hint
    assert "RELIABLE_TASKS_OUTBOX_RETENTION" in hint  # the known settings are listed
    with override_settings(RELIABLE_TASKS_RELAY_BATCH_SIZE=100):
        assert messages() == []


# -- E002, W002, W003: database and cache -------------------------------------------------------


def test_an_outbox_database_missing_from_databases_is_error_e002() -> None:
    with override_settings(RELIABLE_TASKS_DATABASE="outbox"):
        error = only("reliable_tasks.E002")
    assert "'outbox'" in error.msg
    with override_settings(RELIABLE_TASKS_DATABASE="default"):
        assert messages() == []


def test_relays_in_workers_on_a_sqlite_outbox_is_warning_w002() -> None:
    with (
        outbox_database("django.db.backends.sqlite3"),
        override_settings(RELIABLE_TASKS_RELAY_IN_WORKER=True),
    ):
        warning = only("reliable_tasks.W002")
    assert "SQLite" in warning.msg
    assert "reliable_tasks relay" in (warning.hint or "")


def test_one_relay_on_sqlite_or_relays_in_workers_on_postgresql_pass_w002() -> None:
    with (
        outbox_database("django.db.backends.sqlite3"),
        override_settings(RELIABLE_TASKS_RELAY_IN_WORKER=False),
    ):
        assert messages() == []
    with (
        outbox_database("django.db.backends.postgresql"),
        override_settings(RELIABLE_TASKS_RELAY_IN_WORKER=True),
    ):
        assert messages() == []


def test_an_idempotency_cache_missing_from_caches_is_warning_w003() -> None:
    with override_settings(RELIABLE_TASKS_CACHE_ALIAS="idempotency"):
        warning = only("reliable_tasks.W003")
    assert "'idempotency'" in warning.msg
    with override_settings(RELIABLE_TASKS_CACHE_ALIAS=None):
        assert messages() == []


@pytest.mark.parametrize("backend", ["locmem.LocMemCache", "dummy.DummyCache"])
def test_an_idempotency_cache_each_process_keeps_to_itself_is_warning_w007(backend: str) -> None:
    caches = {
        "default": settings.CACHES["default"],
        "local": {"BACKEND": f"django.core.cache.backends.{backend}"},
    }
    with override_settings(CACHES=caches, RELIABLE_TASKS_CACHE_ALIAS="local"):
        warning = only("reliable_tasks.W007")
    assert f"'local', a {backend.split('.')[1]}, which each process keeps to itself" in warning.msg
    assert "crash-loop counting" in warning.msg
    assert "Redis" in (warning.hint or "")
    with override_settings(CACHES=caches, RELIABLE_TASKS_CACHE_ALIAS="default"):
        assert messages() == []
    with override_settings(CACHES=caches, RELIABLE_TASKS_CACHE_ALIAS=None):
        assert messages() == []


# -- E003: the Celery app ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["tests.no_such_module:app", "tests.settings:SECRET_KEY"])
def test_a_celery_app_path_that_leads_to_no_celery_app_is_error_e003(path: str) -> None:
    with override_settings(RELIABLE_TASKS_CELERY_APP=path):
        assert ids() == ["reliable_tasks.E003"]
    with override_settings(RELIABLE_TASKS_CELERY_APP="tests.celery_app:app"):
        assert messages() == []


# -- W004 to W006: Celery's configuration ------------------------------------------------------


def test_rabbitmq_without_publisher_confirms_is_warning_w004(celery_conf: CeleryConf) -> None:
    celery_conf(broker_transport_options={"max_retries": 3})
    warning = only("reliable_tasks.W004")
    assert "Reliable tasks are not affected" in warning.msg
    assert '{"confirm_publish": True}' in (warning.hint or "")
    celery_conf(broker_transport_options={"max_retries": 3, "confirm_publish": True})
    assert messages() == []


def test_publisher_confirms_are_not_asked_of_brokers_other_than_rabbitmq(
    celery_conf: CeleryConf, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CELERY_BROKER_WRITE_URL", raising=False)
    celery_conf(broker_transport_options={}, broker_write_url="redis://127.0.0.1:6379/0")
    assert messages() == []
    celery_conf(broker_write_url="pyamqp://guest@127.0.0.1//;redis://127.0.0.1:6379/0")
    assert ids() == ["reliable_tasks.W004"]


def test_a_pickle_task_serializer_is_error_e004(celery_conf: CeleryConf) -> None:
    celery_conf(task_serializer="pickle")
    assert ids() == ["reliable_tasks.E004"]
    celery_conf(task_serializer="json")
    assert messages() == []


@pytest.mark.parametrize("pickle", ["pickle", "application/x-python-serialize"])
def test_accepting_pickle_is_error_e005(celery_conf: CeleryConf, pickle: str) -> None:
    celery_conf(accept_content=["json", pickle])
    assert ids() == ["reliable_tasks.E005"]
    celery_conf(accept_content=["application/json"])
    assert messages() == []


def test_accepting_no_json_is_error_e006(celery_conf: CeleryConf) -> None:
    celery_conf(accept_content=["msgpack"])
    error = only("reliable_tasks.E006")
    assert "'msgpack'" in error.msg
    celery_conf(accept_content=["msgpack", "json"])
    assert messages() == []


@pytest.mark.parametrize(
    "pickled", [{"result_serializer": "pickle"}, {"result_accept_content": ["json", "pickle"]}]
)
def test_pickled_results_are_warning_w005(celery_conf: CeleryConf, pickled: dict[str, Any]) -> None:
    celery_conf(**pickled)
    assert ids() == ["reliable_tasks.W005"]
    celery_conf(result_serializer="json", result_accept_content=["json"])
    assert messages() == []


def test_eager_mode_outside_a_test_run_is_warning_w006(
    celery_conf: CeleryConf, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Outside a test run there is no mail.outbox (teardown_test_environment deletes it).
    monkeypatch.delattr(mail, "outbox")
    celery_conf(task_always_eager=True)
    warning = only("reliable_tasks.W006")
    assert "SILENCED_SYSTEM_CHECKS" in (warning.hint or "")
    celery_conf(task_always_eager=False)
    assert messages() == []


def test_eager_mode_under_a_test_runner_passes_w006(celery_conf: CeleryConf) -> None:
    celery_conf(task_always_eager=True)
    assert messages() == []


@pytest.mark.django_db
def test_w006_can_be_silenced_where_eager_mode_is_deliberate(
    celery_conf: CeleryConf, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(mail, "outbox")
    celery_conf(task_always_eager=True)
    with override_settings(SILENCED_SYSTEM_CHECKS=["reliable_tasks.W006"]):
        call_command("check", fail_level="WARNING", verbosity=0)


OLD_SENTRY_SDK = """
import sentry_sdk.tracing_utils

# What sentry-sdk 2.0 lacks: the integration imports it.
del sentry_sdk.tracing_utils.PropagationContext
import django

django.setup()
from django.core.management import call_command

from reliable_tasks import signals

call_command("check", "--tag", "reliable_tasks")
connected = [str(key[0]) for key, *_ in signals.task_dead.receivers]
print("sentry receivers:", sum(uid.startswith("reliable_tasks.integrations.sentry") for uid in connected))
"""


def test_a_sentry_sdk_too_old_for_the_integration_is_warning_w008_and_a_log_line() -> None:
    """A sentry-sdk that lacks what the integration imports (as 2.0 does) turns the integration
    off, said by the check (for deploys) and a log line (for workers, which run no checks),
    where it would otherwise be off without a word."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", OLD_SENTRY_SDK], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=60, check=True,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert "(reliable_tasks.W008)" in output
    assert "is installed, but cannot import name 'PropagationContext'" in output
    assert "HINT: Upgrade it: pip install 'sentry-sdk>=2.12'" in output
    assert output.count("needs sentry-sdk 2.12 or later and is off") == 2  # the check, the log
    assert "sentry receivers: 0" in done.stdout
    # The sentry-sdk installed here is recent enough: no warning.
    assert "reliable_tasks.W008" not in ids()


# -- E007 to E009: reliable tasks --------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        ({"durable": False}, "is not durable"),
        ({"auto_delete": True}, "auto-deletes"),
        ({"exclusive": True}, "is exclusive"),
        ({"queue_arguments": {"x-expires": 60_000}}, "expires"),
        ({"exchange": Exchange(TRANSIENT, durable=False)}, "exchange 'rt-checks.transient'"),
    ],
)
def test_a_reliable_task_routed_to_a_queue_that_can_vanish_is_error_e007(
    celery_conf: CeleryConf, flags: dict[str, Any], said: str
) -> None:
    declared = {"exchange": Exchange(TRANSIENT), "routing_key": TRANSIENT, **flags}
    celery_conf(
        task_queues=[Queue(TRANSIENT, **declared)], task_routes={RECORD: {"queue": TRANSIENT}}
    )
    error = only("reliable_tasks.E007")
    assert f"'{RECORD}'" in error.msg
    assert said in error.msg
    celery_conf(task_queues=[Queue(TRANSIENT, Exchange(TRANSIENT), routing_key=TRANSIENT)])
    assert messages() == []


def test_a_reliable_task_whose_own_queue_option_names_a_transient_queue_is_error_e007(
    celery_conf: CeleryConf, reliable_record: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    celery_conf(task_queues=[Queue(TRANSIENT, Exchange(TRANSIENT), TRANSIENT, auto_delete=True)])
    monkeypatch.setattr(reliable_record, "queue", TRANSIENT, raising=False)
    assert ids() == ["reliable_tasks.E007"]


def test_plain_tasks_may_use_transient_queues(celery_conf: CeleryConf) -> None:
    celery_conf(
        task_queues=[Queue(TRANSIENT, Exchange(TRANSIENT), TRANSIENT, durable=False)],
        task_routes={"tests.testapp.tasks.plain_record": {"queue": TRANSIENT}},
    )
    assert messages() == []


def test_a_reliable_task_routed_to_an_undeclared_queue_is_error_e008(
    celery_conf: CeleryConf,
) -> None:
    celery_conf(
        task_create_missing_queues=False, task_routes={RECORD: {"queue": "rt-checks.nowhere"}}
    )
    error = only("reliable_tasks.E008")
    assert f"'{RECORD}'" in error.msg
    celery_conf(task_create_missing_queues=True)
    assert messages() == []


def test_compression_for_all_tasks_is_error_e009(celery_conf: CeleryConf) -> None:
    celery_conf(task_compression="gzip")
    error = only("reliable_tasks.E009")
    assert "task_compression" in error.msg
    celery_conf(task_compression=None)
    assert messages() == []


@pytest.mark.parametrize(("option", "value"), [("serializer", "pickle"), ("compression", "zlib")])
def test_a_reliable_task_with_an_option_the_outbox_refuses_is_error_e009(
    reliable_record: Any, monkeypatch: pytest.MonkeyPatch, option: str, value: str
) -> None:
    monkeypatch.setattr(reliable_record, option, value, raising=False)
    error = only("reliable_tasks.E009")
    assert f"'{RECORD}'" in error.msg


@pytest.mark.parametrize(
    ("option", "value"),
    [("acks_late", False), ("reject_on_worker_lost", False), ("acks_on_timeout", True)],
)
def test_a_reliable_task_made_to_acknowledge_what_it_did_not_run_is_error_e010(
    monkeypatch: pytest.MonkeyPatch, option: str, value: bool
) -> None:
    """As task_annotations would set it, after the declaration that refuses it."""
    from tests.testapp.tasks import record

    monkeypatch.setattr(record, option, value)
    error = only("reliable_tasks.E010")
    assert f"Reliable task {record.name!r} has {option}={value!r}" in error.msg
    monkeypatch.undo()
    assert "reliable_tasks.E010" not in ids()
