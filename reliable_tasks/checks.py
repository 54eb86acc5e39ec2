"""System checks (``python manage.py check``): configurations that would lose or repeat work.

Every check reads configuration only (settings, the Celery app's configuration and task
registry): none queries the database or connects to the broker, so ``check`` stays cheap and
works with the services down.

Ids and what each finds:

- ``reliable_tasks.E001``: a ``RELIABLE_TASKS_*`` setting of the wrong type or shape
- ``reliable_tasks.W001``: a ``RELIABLE_TASKS_*`` setting that does not exist (a typo)
- ``reliable_tasks.E002``: ``RELIABLE_TASKS_DATABASE`` names no alias in ``DATABASES``
- ``reliable_tasks.W002``: ``RELIABLE_TASKS_RELAY_IN_WORKER`` with the outbox on SQLite
- ``reliable_tasks.W003``: ``RELIABLE_TASKS_CACHE_ALIAS`` names no alias in ``CACHES``
- ``reliable_tasks.W007``: ``RELIABLE_TASKS_CACHE_ALIAS`` names a cache each process keeps to itself
- ``reliable_tasks.E003``: ``RELIABLE_TASKS_CELERY_APP`` cannot be imported, or is no Celery app
- ``reliable_tasks.W004``: publisher confirms off for plain Celery publishing to RabbitMQ
- ``reliable_tasks.E004``: ``task_serializer`` is pickle
- ``reliable_tasks.E005``: ``accept_content`` includes pickle
- ``reliable_tasks.E006``: ``accept_content`` lacks JSON, the format of reliable tasks
- ``reliable_tasks.W005``: results serialized or accepted as pickle
- ``reliable_tasks.W006``: ``task_always_eager`` outside a test run
- ``reliable_tasks.W008``: an installed sentry-sdk too old for the Sentry integration
- ``reliable_tasks.E007``: a reliable task routed to a queue that does not survive a restart
- ``reliable_tasks.E008``: a reliable task routed to a queue that is not declared
- ``reliable_tasks.E009``: compression or a non-JSON serializer, which the outbox refuses
- ``reliable_tasks.E010``: a reliable task made to acknowledge a message it may not have run
  (``acks_late``, ``reject_on_worker_lost`` or ``acks_on_timeout`` changed after it was declared,
  by ``task_annotations`` say)
"""

from __future__ import annotations

import difflib
import importlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, cast

from celery import Celery
from celery.app import routes as celery_routes
from celery.exceptions import QueueNotFound
from celery.loaders.base import autodiscover_tasks  # type: ignore[attr-defined]  # celery-types omits it
from celery.utils.functional import maybe_list
from django.apps import AppConfig, apps
from django.core import checks, mail
from django.core.exceptions import ImproperlyConfigured
from django.db.utils import load_backend

from .conf import SETTINGS, conf
from .outbox import SERIALIZER
from .relay import get_celery_app
from .task import KEPT_OPTIONS, ReliableTask

TAG = "reliable_tasks"

# Settings whose value must be a (base, cap) pair of seconds, checked by conf.backoff_pair().
_BACKOFF_PAIRS = ("RELAY_RECONNECT_BACKOFF", "RELAY_PUBLISH_RETRY_BACKOFF")

# kombu transports that speak AMQP 0-9-1 to RabbitMQ through py-amqp, which honours
# confirm_publish (librabbitmq does not support it, so suggesting it there would not help).
_RABBITMQ_TRANSPORTS = frozenset({"amqp", "amqps", "pyamqp", "pyamqps"})

_PICKLE = "application/x-python-serialize"
_JSON = "application/json"
# Celery settings name serializers or content types; only these two matter here.
_CONTENT_TYPES = {"pickle": _PICKLE, "json": _JSON}


def _prefixed(name: str) -> str:
    return f"RELIABLE_TASKS_{name}"


# --------------------------------------------------------------------------------------------
# Settings


@checks.register(TAG)
def check_setting_values(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E001: each ``RELIABLE_TASKS_*`` setting has a value conf accepts."""
    problems: list[checks.CheckMessage] = []
    invalid: set[str] = set()

    def report(name: str, exc: ImproperlyConfigured) -> None:
        invalid.add(name)
        problems.append(
            checks.Error(
                str(exc),
                hint=f"Fix {_prefixed(name)} in your settings, or remove it to use the default "
                f"({SETTINGS[name].default!r}).",
                id="reliable_tasks.E001",
            )
        )

    for name in SETTINGS:
        try:
            getattr(conf, name)
        except ImproperlyConfigured as exc:
            report(name, exc)
    # Values of the right type can still have the wrong shape.
    for name in _BACKOFF_PAIRS:
        if name not in invalid:
            try:
                conf.backoff_pair(name)
            except ImproperlyConfigured as exc:
                report(name, exc)
    if "RETRY_POLICY" not in invalid:
        try:
            conf.retry_policy()
        except ImproperlyConfigured as exc:
            report("RETRY_POLICY", exc)
    return problems


@checks.register(TAG)
def check_unknown_settings(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W001: no ``RELIABLE_TASKS_*`` setting that reliable_tasks does not know (a typo)."""
    known = ", ".join(_prefixed(name) for name in sorted(SETTINGS))
    problems: list[checks.CheckMessage] = []
    for name in conf.configured_names():
        if name in SETTINGS:
            continue
        close = difflib.get_close_matches(name, SETTINGS, n=1)
        guess = f"Did you mean {_prefixed(close[0])}? " if close else ""
        problems.append(
            checks.Warning(
                f"{_prefixed(name)} is not a reliable_tasks setting; it has no effect.",
                hint=f"{guess}Rename or remove it. The settings are: {known}.",
                id="reliable_tasks.W001",
            )
        )
    return problems


# --------------------------------------------------------------------------------------------
# Database and cache


@checks.register(TAG)
def check_database(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E002: the outbox database exists; W002: no relay in every worker on SQLite."""
    try:
        alias = conf.DATABASE
        relay_in_worker = conf.RELAY_IN_WORKER
    except ImproperlyConfigured:
        return []  # E001 reports it
    engine = conf.database_engine(alias)
    if engine is None:
        return [
            checks.Error(
                f"RELIABLE_TASKS_DATABASE is {alias!r}, but DATABASES has no such alias: the "
                "outbox, the idempotency ledger and the dead tasks have no database.",
                hint="Set RELIABLE_TASKS_DATABASE to one of the aliases in DATABASES "
                "(the default is 'default').",
                id="reliable_tasks.E002",
            )
        ]
    if relay_in_worker and _vendor(engine) == "sqlite":
        return [
            checks.Warning(
                f"RELIABLE_TASKS_RELAY_IN_WORKER is on and the outbox database {alias!r} is "
                "SQLite: every Celery worker runs a relay, and relays cannot share an outbox on "
                "SQLite (it has no SELECT ... FOR UPDATE SKIP LOCKED). With a second worker, or "
                "a worker beside `manage.py reliable_tasks relay`, the relays publish the same "
                "rows twice and fight over SQLite's single write lock.",
                hint="Run exactly one relay on SQLite: set RELIABLE_TASKS_RELAY_IN_WORKER = False "
                "and run one `python manage.py reliable_tasks relay`, or move the outbox to "
                "PostgreSQL to run several. If only one worker ever runs, silence this with "
                "SILENCED_SYSTEM_CHECKS = ['reliable_tasks.W002'].",
                id="reliable_tasks.W002",
            )
        ]
    return []


def _vendor(engine: str) -> str:
    # The backend's class says what it is (spatialite is SQLite too); importing it connects nothing.
    try:
        return str(load_backend(engine).DatabaseWrapper.vendor)
    except ImproperlyConfigured:
        return ""  # Django's own checks and the first query report a backend that is missing


@checks.register(TAG)
def check_cache(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W003: the cache of completed idempotency keys exists (unless turned off); W007: shared."""
    try:
        alias = conf.CACHE_ALIAS
    except ImproperlyConfigured:
        return []  # E001 reports it
    if alias is None:
        return []
    if alias in conf.cache_aliases():
        return _per_process_cache(alias)
    return [
        checks.Warning(
            f"RELIABLE_TASKS_CACHE_ALIAS is {alias!r}, but CACHES has no such alias: the cache "
            "of completed idempotency keys never works, so every duplicate check goes to the "
            "database and each worker logs the cache as unavailable.",
            hint="Set RELIABLE_TASKS_CACHE_ALIAS to one of the aliases in CACHES, or to None to "
            "turn the cache of completed keys off (the ledger in the database stays the truth).",
            id="reliable_tasks.W003",
        )
    ]


def _per_process_cache(alias: str) -> list[checks.CheckMessage]:
    """W007: the cache is shared by the workers (not one each process keeps to itself)."""
    from .ledger import PER_PROCESS_CACHES

    backend = str(conf.cache_settings(alias).get("BACKEND", ""))
    if backend not in PER_PROCESS_CACHES:
        return []
    return [
        checks.Warning(
            f"RELIABLE_TASKS_CACHE_ALIAS is {alias!r}, a {backend.rsplit('.', 1)[-1]}, which "
            "each process keeps to itself: workers do not share completed keys, so duplicates "
            "are checked in the database, and crash-loop counting cannot tell a delivery that "
            "started from one a dead worker had only prefetched (it counts both).",
            hint="Point RELIABLE_TASKS_CACHE_ALIAS at a cache all workers share (Redis through "
            "django-redis, Memcached, a database or file cache), or set it to None.",
            id="reliable_tasks.W007",
        )
    ]


# --------------------------------------------------------------------------------------------
# The Celery app


def _load_app() -> Celery:
    app = get_celery_app()
    if not isinstance(app, Celery):
        raise TypeError(f"it is a {type(app).__name__}, not a Celery app")
    return app


def _app_or_none() -> Celery | None:
    """The Celery app the checks read, or None when E001 or E003 reports why there is none."""
    try:
        return _load_app()
    except (ImproperlyConfigured, ImportError, TypeError):
        return None


def _label(app: Celery) -> str:
    return repr(app.main or "default")


@checks.register(TAG)
def check_celery_app(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E003: ``RELIABLE_TASKS_CELERY_APP`` names a Celery app that imports."""
    try:
        path = conf.CELERY_APP
    except ImproperlyConfigured:
        return []  # E001 reports it
    try:
        _load_app()
    except (ImportError, TypeError) as exc:
        return [
            checks.Error(
                f"RELIABLE_TASKS_CELERY_APP is {path!r}, which does not lead to a Celery app: "
                f"{exc}. Nothing can be enqueued or relayed.",
                hint="Set RELIABLE_TASKS_CELERY_APP to 'module:attribute' of your Celery app "
                "(e.g. 'proj.celery:app'), or remove it to use Celery's current app.",
                id="reliable_tasks.E003",
            )
        ]
    return []


def _transport(app: Celery) -> str:
    """The kombu transport Celery publishes with, read from the URL as kombu reads it."""
    config: Any = app.conf
    url = config.broker_write_url
    if isinstance(url, list | tuple):
        url = url[0] if url else None
    if isinstance(url, str) and "://" in url:
        # 'a;b' lists failover URLs; 'sqla+postgresql://' names the transport before the '+'.
        return url.split(";", 1)[0].split("://", 1)[0].split("+", 1)[0]
    return str(config.broker_transport or "amqp")


@checks.register(TAG)
def check_publisher_confirms(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W004: Celery's own publishing to RabbitMQ waits for the broker's confirms."""
    app = _app_or_none()
    if app is None or _transport(app) not in _RABBITMQ_TRANSPORTS:
        return []
    config: Any = app.conf
    if (config.broker_transport_options or {}).get("confirm_publish"):
        return []
    return [
        checks.Warning(
            f"Publisher confirms are off for the Celery app {_label(app)} on RabbitMQ: a plain "
            "Celery task (and Celery's own publishing, such as a plain task's self.retry()) "
            "counts as sent before RabbitMQ has it, and a broker under pressure or restarting can "
            "drop it. Reliable tasks are not affected: the relay confirms each batch on its own "
            "channel.",
            hint='Set broker_transport_options = {"confirm_publish": True} in the Celery '
            'configuration (CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True} in '
            "Django settings read with namespace='CELERY'), keeping any other options there.",
            id="reliable_tasks.W004",
        )
    ]


def _content_types(value: Any) -> set[str]:
    """Content types of a serializer name, or of a list of names and content types."""
    names: Iterable[Any] = [value] if isinstance(value, str) else (value or ())
    return {_CONTENT_TYPES.get(str(name), str(name)) for name in names}


@checks.register(TAG)
def check_serializers(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E004, E005, E006, W005: no pickle anywhere, and workers accept JSON."""
    app = _app_or_none()
    if app is None:
        return []
    config: Any = app.conf
    label = _label(app)
    problems: list[checks.CheckMessage] = []
    if _PICKLE in _content_types(config.task_serializer):
        problems.append(
            checks.Error(
                f"task_serializer is 'pickle' for the Celery app {label}: plain tasks are "
                "published as pickle, and loading one runs code taken from the message. Reliable "
                "tasks travel as JSON whatever this says.",
                hint="Set task_serializer = 'json' (CELERY_TASK_SERIALIZER) and pass JSON values "
                "to tasks (a model's primary key, not the instance).",
                id="reliable_tasks.E004",
            )
        )
    accepted = _content_types(config.accept_content)
    if _PICKLE in accepted:
        problems.append(
            checks.Error(
                f"accept_content includes pickle for the Celery app {label}: a worker unpickles, "
                "and so runs code from, any message that says it is pickled; whoever can publish "
                "to the broker can run code on the workers.",
                hint="Set accept_content = ['json'] (CELERY_ACCEPT_CONTENT); reliable tasks need "
                "only JSON.",
                id="reliable_tasks.E005",
            )
        )
    if _JSON not in accepted:
        problems.append(
            checks.Error(
                f"accept_content is {config.accept_content!r} for the Celery app {label}, without "
                "json: workers refuse every reliable task, since reliable tasks always travel as "
                "JSON; none of them runs.",
                hint="Add 'json' to accept_content (CELERY_ACCEPT_CONTENT).",
                id="reliable_tasks.E006",
            )
        )
    result_accepted = (
        set()
        if config.result_accept_content is None
        else _content_types(config.result_accept_content)
    )
    if _PICKLE in _content_types(config.result_serializer) | result_accepted:
        problems.append(
            checks.Warning(
                f"Results of the Celery app {label} are serialized or accepted as pickle "
                f"(result_serializer {config.result_serializer!r}, result_accept_content "
                f"{config.result_accept_content!r}): reading a result (AsyncResult.get()) runs "
                "code from the result backend.",
                hint="Set result_serializer = 'json' and result_accept_content = ['json'] "
                "(CELERY_RESULT_SERIALIZER, CELERY_RESULT_ACCEPT_CONTENT), and return JSON values "
                "from tasks.",
                id="reliable_tasks.W005",
            )
        )
    return problems


def _under_test_runner() -> bool:
    # Django sets no flag for "tests are running"; setup_test_environment(), which both
    # `manage.py test` and pytest-django call before anything runs, creates mail.outbox, and
    # teardown_test_environment() removes it. It is the one public sign of a test run.
    return hasattr(mail, "outbox")


@checks.register(TAG)
def check_eager(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W006: ``task_always_eager`` only in tests."""
    app = _app_or_none()
    if app is None or not app.conf.task_always_eager or _under_test_runner():
        return []
    return [
        checks.Warning(
            f"task_always_eager is on for the Celery app {_label(app)} outside a test run: every "
            "task, reliable ones included, runs inline in the caller's process and transaction. "
            "Nothing goes through the outbox or RabbitMQ, and a failure raises at the call instead "
            "of being retried.",
            hint="Turn it off (CELERY_TASK_ALWAYS_EAGER = False) in settings that serve traffic. "
            "This check is quiet under `manage.py test` and pytest-django; where eager mode is "
            "deliberate outside them, add 'reliable_tasks.W006' to SILENCED_SYSTEM_CHECKS in "
            "those settings. In tests, reliable_tasks.testing.run_enqueued() runs the outbox "
            "inline without eager mode.",
            id="reliable_tasks.W006",
        )
    ]


@checks.register(TAG)
def check_sentry_sdk(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """W008: an installed sentry-sdk too old for the integration, which is then off."""
    from .integrations import sentry

    if not sentry.UNUSABLE_SENTRY_SDK:
        return []
    return [
        checks.Warning(
            f"{sentry.unusable_message()}.",
            hint=f"Upgrade it: pip install 'sentry-sdk>={sentry.MINIMUM_SENTRY_SDK}' (or "
            "'reliable-tasks[sentry]', which asks for it).",
            id="reliable_tasks.W008",
        )
    ]


# --------------------------------------------------------------------------------------------
# Reliable tasks: where they are routed, and options the outbox refuses


def _reliable_tasks(app: Celery) -> list[ReliableTask]:
    state: Any = app  # celery-types does not declare these attributes
    # An app that forbids finalizing on access has no tasks to look at yet.
    if not state.autofinalize and not state.finalized:
        return []
    # app.autodiscover_tasks() imports the task modules only when a worker starts (on Celery's
    # import_modules signal, whose Django fixup runs these very checks: sending it here would
    # recurse). Import what it would find, so that the tasks are registered in `check` too.
    autodiscover_tasks([config.name for config in apps.get_app_configs()], "tasks")
    for module in (*maybe_list(state.conf.imports or ()), *maybe_list(state.conf.include or ())):
        importlib.import_module(module)
    found = (task for task in app.tasks.values() if isinstance(task, ReliableTask))
    return sorted(found, key=lambda task: str(task.name))


def _flaws(queue: Any) -> list[str]:
    """What makes RabbitMQ drop a queue, with its messages, on a restart or when unused."""
    flaws = []
    if not queue.durable:
        flaws.append("is not durable (a broker restart deletes it)")
    if queue.exclusive:
        flaws.append("is exclusive (deleted when the connection that declared it closes)")
    elif queue.auto_delete:
        flaws.append("auto-deletes (deleted when its last consumer goes)")
    if "x-expires" in (queue.queue_arguments or {}):
        flaws.append("expires (x-expires: deleted after a while without consumers)")
    exchange = queue.exchange
    if exchange is not None and exchange.name:
        if not exchange.durable:
            flaws.append(f"is bound to exchange {exchange.name!r}, which is not durable")
        elif exchange.auto_delete:
            flaws.append(f"is bound to exchange {exchange.name!r}, which auto-deletes")
    return flaws


@checks.register(TAG)
def check_reliable_tasks(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E007, E008: reliable tasks go to durable, declared queues; E009: options the outbox takes."""
    app = _app_or_none()
    if app is None:
        return []
    config: Any = app.conf
    label = _label(app)
    problems: list[checks.CheckMessage] = []
    if config.task_compression:
        problems.append(_compression_error(f"task_compression of the Celery app {label}"))
    # A router built now from the configuration routes as Celery's would, without adding
    # queues to the app's own (cached) mapping.
    router = celery_routes.Router(
        celery_routes.prepare(config.task_routes),
        app.amqp.Queues(config.task_queues),
        config.task_create_missing_queues,
        app=app,
    )
    flawed: dict[str, list[str]] = defaultdict(list)
    flaws_of: dict[str, list[str]] = {}
    undeclared: dict[str, list[str]] = defaultdict(list)
    for task in _reliable_tasks(app):
        name = str(task.name)
        problems.extend(_option_errors(task, name))
        options = {
            option: getattr(task, option)
            for option in ("queue", "exchange", "routing_key")
            if getattr(task, option, None) is not None
        }
        try:
            # Celery passes the task instance (celery-types says the class).
            route = router.route(options, name, (), {}, task_type=cast(Any, task))
        except QueueNotFound as exc:
            undeclared[str(exc)].append(name)
            continue
        except Exception:  # noqa: BLE001 - a router that needs real arguments is judged at enqueue
            continue
        queue = route.get("queue")
        if queue is not None:
            flaws = _flaws(queue)
            if flaws:
                flawed[str(queue.name)].append(name)
                flaws_of[str(queue.name)] = flaws
    for missing, task_names in sorted(undeclared.items()):
        problems.append(
            checks.Error(
                f"{_these(task_names)} routed to a queue that task_queues of the Celery app "
                f"{label} does not declare, and task_create_missing_queues is off ({missing}): "
                "every enqueue raises QueueNotFound.",
                hint="Declare the queue (durable) in task_queues, or route the tasks to a "
                "declared queue.",
                id="reliable_tasks.E008",
            )
        )
    for queue_name, task_names in sorted(flawed.items()):
        problems.append(
            checks.Error(
                f"{_these(task_names)} routed to queue {queue_name!r}, which "
                f"{' and '.join(flaws_of[queue_name])}: RabbitMQ would drop the queue and the "
                "messages in it, after the relay marked them dispatched.",
                hint=f"Declare queue {queue_name!r} in task_queues with durable=True, "
                "auto_delete=False, exclusive=False, no x-expires and a durable exchange, or route "
                "the tasks to such a queue. RabbitMQ keeps the flags a queue was declared with: "
                "delete the existing queue (once drained) before it is declared again.",
                id="reliable_tasks.E007",
            )
        )
    return problems


def _these(task_names: list[str]) -> str:
    """'Reliable task 'a' is' or 'Reliable tasks 'a', 'b' are'."""
    names = ", ".join(repr(name) for name in task_names)
    return f"Reliable task {names} is" if len(task_names) == 1 else f"Reliable tasks {names} are"


def _compression_error(where: str) -> checks.CheckMessage:
    return checks.Error(
        f"{where} asks for compression, which the outbox does not support (it stores the "
        "message as text): every delay() of a reliable task raises UnsupportedOption.",
        hint="Remove the compression option (and CELERY_TASK_COMPRESSION); compress large data "
        "yourself and pass its key.",
        id="reliable_tasks.E009",
    )


def _option_errors(task: ReliableTask, name: str) -> list[checks.CheckMessage]:
    problems: list[checks.CheckMessage] = []
    for option, kept in KEPT_OPTIONS.items():
        value = getattr(task, option, kept)
        if value is not None and bool(value) is not kept:
            problems.append(
                checks.Error(
                    f"Reliable task {name!r} has {option}={value!r} (set after it was declared, "
                    "by task_annotations say): a worker that dies, or a hard time limit, would "
                    "acknowledge a message whose task did not run, and lose it.",
                    hint=f"Remove what sets {option} for this task (task_annotations, or an "
                    "attribute set on it); reliable tasks need acks_late=True, "
                    "reject_on_worker_lost=True and acks_on_timeout=False.",
                    id="reliable_tasks.E010",
                )
            )
    if getattr(task, "compression", None):
        problems.append(_compression_error(f"Reliable task {name!r}"))
    if task.serializer not in (None, SERIALIZER):
        problems.append(
            checks.Error(
                f"Reliable task {name!r} sets serializer={task.serializer!r}; reliable tasks travel "
                f"as {SERIALIZER} only: every delay() of it raises UnsupportedOption.",
                hint="Remove the serializer option from the task.",
                id="reliable_tasks.E009",
            )
        )
    return problems
