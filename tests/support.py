"""Helpers for tests that drive real services and processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kombu import Connection, Queue

ROOT = Path(__file__).resolve().parent.parent
QUEUE = os.environ["RT_TEST_QUEUE"]  # set by tests/settings.py
ROUTED_QUEUE = QUEUE + ".routed"
BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


def service_reachable(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


class TcpProxy:
    """Forwards a local port to a service, and can cut it: the service goes away for the
    processes that connect through it (and only for them), with no service stopped.

    Cut, it closes every forwarded connection and refuses new ones, as a database that went
    down would; restored, it accepts again on the same port.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, []
        for sock in [listener, *sockets]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class Broker:
    """Raw access to the test session's queues on RabbitMQ, beside Celery."""

    queues = (QUEUE, ROUTED_QUEUE)

    def __init__(self) -> None:
        self.connection = Connection(BROKER_URL)
        self.connection.connect()
        self.channel = self.connection.channel()

    def close(self) -> None:
        self.connection.release()

    def purge(self) -> None:
        for name in self.queues:
            Queue(name, durable=True)(self.channel).declare()
            self.channel.queue_purge(name)

    def delete_all(self) -> None:
        for name in self.queues:
            self.channel.queue_delete(name)
        self.close()

    def depth(self, name: str = QUEUE) -> int:
        _, count, _ = self.channel.queue_declare(name, passive=True)
        return int(count)

    def get_all(
        self, name: str = QUEUE, expect: int | None = None, timeout: float = 10.0
    ) -> list[Any]:
        """Take messages off ``name`` (acknowledging them) until ``expect`` or the queue is empty."""
        messages: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.channel.basic_get(name, no_ack=True)
            if message is not None:
                messages.append(message)
                continue
            if expect is None or len(messages) >= expect:
                break
            time.sleep(0.05)
        return messages


@dataclass
class ProcessFactory:
    """Starts ``manage.py``-style processes against the test database."""

    test_name: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        from django.db import connection

        env = dict(os.environ)
        env["RT_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
        env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
        env["PYTHONPATH"] = str(ROOT)
        return env

    def start(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = Path(tempfile.mkstemp(prefix=f"rt-{self.test_name[:40]}-", suffix=".log")[1])
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, *argv], cwd=ROOT, env={**self.env(), **(env or {})},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def relay(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.start("-m", "django", "reliable_tasks", "relay", *extra, env=env)

    def worker(
        self,
        *queues: str,
        concurrency: int = 1,
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> subprocess.Popen[bytes]:
        """A prefork worker on ``queues``; ``extra``: more of ``celery worker``'s options."""
        return self.start(
            "-m", "celery", "-A", "tests.celery_app", "worker", "-l", "info",
            "-Q", ",".join(queues or (QUEUE,)), "-c", str(concurrency), "-P", "prefork",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"w{len(self.procs)}-{os.getpid()}@%h", *extra,
            env=env,
        )  # fmt: skip

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[self.procs.index(proc)].read_text(errors="replace")

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal the process group (a prefork worker's children die with it on SIGKILL)."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc, signal.SIGKILL)
        for proc, log in zip(self.procs, self.logs, strict=True):
            # Shown by pytest only when the test failed: the processes' own account.
            tail = log.read_text(errors="replace")[-4000:]
            print(f"--- {' '.join(map(str, proc.args))} (exit {proc.returncode}) ---\n{tail}")
            log.unlink(missing_ok=True)


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def effects(key_prefix: str = "") -> list[str]:
    from tests.testapp.models import Effect

    return list(Effect.objects.filter(key__startswith=key_prefix).values_list("key", flat=True))


def make_dead_task(
    task: Any,
    *args: Any,
    reason: str = "exhausted",
    exc_type: str = "tests.testapp.tasks.GatewayTimeout",
    exc_message: str = "the payment gateway timed out",
    attempts: int = 3,
    save: bool = True,
    task_kwargs: dict[str, Any] | None = None,
    **fields: Any,
) -> Any:
    """A dead task holding a real message: ``task`` is enqueued with ``args`` through the outbox.

    The outbox row is marked dispatched (as the relay would have), and the dead task copies its
    message, as ``reliable_tasks.dead.capture`` does after ``attempts`` failures. ``fields``
    override DeadTask fields (``task_name``, ``exc_message``, ...). With ``save=False`` the
    dead task is returned unsaved, for ``bulk_create``.
    """
    from datetime import timedelta

    from django.utils import timezone
    from kombu import serialization

    from reliable_tasks.models import DeadTask, OutboxMessage, OutboxStatus

    result = task.delay(*args, **(task_kwargs or {}))
    row = OutboxMessage.objects.get(task_id=result.id)
    OutboxMessage.objects.filter(pk=row.pk).update(
        status=OutboxStatus.DISPATCHED, dispatched_at=timezone.now()
    )
    decoded_args, decoded_kwargs, _embed = serialization.loads(
        row.body, row.content_type, row.content_encoding, accept=[row.content_type]
    )
    now = timezone.now()
    started = [now - timedelta(minutes=10 * (attempts - n)) for n in range(attempts)]
    recorded = [
        {
            "number": n + 1,
            "outcome": "failed",
            "exc_type": exc_type,
            "message": exc_message,
            "traceback": (
                "Traceback (most recent call last):\n"
                f'  File "/app/tests/testapp/tasks.py", line 21, in {row.task_name.rpartition(".")[2]}\n'
                "    gateway.charge(order)\n"
                f"{exc_type}: {exc_message}\n"
            ),
            "worker": "celery@worker-1",
            "started_at": start.isoformat(),
            "ended_at": (start + timedelta(seconds=1.5)).isoformat(),
        }
        for n, start in enumerate(started)
    ]
    values: dict[str, Any] = {
        "task_id": row.task_id,
        "task_name": row.task_name,
        "args": decoded_args,
        "kwargs": decoded_kwargs,
        "idempotency_key": row.task_id,
        "queue": row.queue,
        "exchange": row.exchange,
        "routing_key": row.routing_key,
        "headers": row.headers,
        "properties": row.properties,
        "body": row.body,
        "content_type": row.content_type,
        "content_encoding": row.content_encoding,
        "reason": reason,
        "exc_type": exc_type,
        "exc_message": exc_message,
        "attempts": recorded,
        "attempt_count": attempts,
        "first_failed_at": started[0] if started else now,
        "last_failed_at": now,
    }
    values.update(fields)
    dead = DeadTask(**values)
    if save:
        dead.save()
    return dead
