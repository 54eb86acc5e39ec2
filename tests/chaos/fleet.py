"""The processes of a chaos run, and the services its faults stop and start again."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
# Other runs on this machine stop RabbitMQ and Redis too: outages take this lock first, so
# that one run's start_app never cuts another's outage short.
SERVICE_LOCK = Path("/tmp/rt-rabbitmq.lock")


@dataclass
class Fleet:
    """Relays and workers, each in a slot; a killed one is replaced in its slot."""

    env: dict[str, str]
    logdir: Path
    queue: str
    concurrency: int = 2
    relays: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    workers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: int = 0
    logs: dict[int, Path] = field(default_factory=dict)  # pid -> log

    def _start(self, label: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.started += 1
        log = self.logdir / f"{self.started:03d}-{label}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, *argv], cwd=ROOT, env=self.env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.logs[proc.pid] = log
        return proc

    def start_relay(self, slot: int) -> None:
        name = f"chaos-relay-{slot}-{self.started + 1}"
        self.relays[slot] = self._start(
            name, ["-m", "django", "reliable_tasks", "relay", "--name", name]
        )

    def start_worker(self, slot: int) -> None:
        name = f"chaos-worker-{slot}-{self.started + 1}"
        self.workers[slot] = self._start(
            name,
            [
                "-m", "celery", "-A", "tests.celery_app", "worker", "-l", "info",
                "-Q", self.queue, "-c", str(self.concurrency), "-P", "prefork",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
                "-n", f"{name}-{os.getpid()}@%h",
            ],
        )  # fmt: skip

    def kill_worker(self, slot: int) -> None:
        _kill(self.workers[slot])
        self.start_worker(slot)

    def kill_relay(self, slot: int) -> None:
        _kill(self.relays[slot])
        self.start_relay(slot)

    def wait_ready(self, stop: threading.Event, timeout: float = 90.0) -> None:
        """Until every worker logged "ready" and every relay "started", or ``stop`` is set."""
        deadline = time.monotonic() + timeout
        pending = [*self.workers.values(), *self.relays.values()]
        while pending and not stop.is_set():
            pending = [p for p in pending if not self._ready(p)]
            dead = [p for p in pending if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a process exited at startup: {self.log_of(dead[0])[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} processes not ready after {timeout} s")
            stop.wait(0.2)

    def _ready(self, proc: subprocess.Popen[bytes]) -> bool:
        text = self.log_of(proc)
        return " ready." in text or (" relay chaos-relay-" in text and " started " in text)

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def exited(self) -> list[str]:
        """The current processes that are no longer running, with their exit codes."""
        procs = [("relay", s, p) for s, p in self.relays.items()]
        procs += [("worker", s, p) for s, p in self.workers.items()]
        return [
            f"{kind} {slot} (exit {p.returncode})"
            for kind, slot, p in procs
            if p.poll() is not None
        ]

    def stop_all(self) -> None:
        for proc in [*self.relays.values(), *self.workers.values()]:
            _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group: a prefork worker's pool child dies with its parent."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@contextlib.contextmanager
def service_lock() -> Iterator[float]:
    """Hold the machine-wide outage lock; yields the seconds spent waiting for it."""
    waited = time.monotonic()
    with SERVICE_LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - waited
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def rabbitmqctl(*args: str, timeout: float = 120.0) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=timeout)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")
        time.sleep(0.2)


def rabbitmq_start() -> None:
    # start_app returns once the app has booted; each rabbitmqctl call costs seconds on a busy
    # machine, so the port stands in for `await_startup`.
    rabbitmqctl("start_app")
    wait_port(5672)


def redis_up() -> bool:
    done = subprocess.run(["redis-cli", "ping"], capture_output=True, timeout=10)
    return done.returncode == 0 and b"PONG" in done.stdout


def redis_stop() -> None:
    subprocess.run(["redis-cli", "shutdown", "nosave"], capture_output=True, timeout=30)
    deadline = time.monotonic() + 10
    while redis_up() and time.monotonic() < deadline:
        time.sleep(0.1)


def redis_start() -> None:
    """Start Redis as scripts/ensure-services does."""
    Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
    Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
         "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
         "--logfile", "/var/log/redis/ci.log"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    wait_port(6379)


def ensure_services() -> None:
    """scripts/ensure-services: start whatever is down."""
    subprocess.run(
        [str(ROOT / "scripts" / "ensure-services")], check=True, capture_output=True, timeout=240
    )


def queue_counts(name: str) -> tuple[int, int] | None:
    """(ready, unacknowledged) messages of a queue as RabbitMQ counts them; None if unknown."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == name:
            return int(parts[1]), int(parts[2])
    return None
