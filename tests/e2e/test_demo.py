"""`make demo`, run the way CI runs it: no admin, a report, an exit code; and, asked for the
admin, the way a person runs it: the admin to log in to, then Ctrl-C."""

from __future__ import annotations

import contextlib
import http.cookiejar
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow

RUN_DEMO = ROOT / "demo_project" / "run_demo.py"


def demo_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The demo's own settings and state: a SQLite file, logs and queue of its own under
    tmp_path, so that it shares nothing with this test run or with a `make demo` beside it.
    """
    # CELERY_BROKER_URL (tox passes it through) would win over the demo's own choice.
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "CELERY_BROKER_URL")
        and not key.startswith("RT_TEST_")
    }
    env.update(DEMO_STATE_DIR=str(tmp_path / "demo"), **settings)
    return env


def run_demo(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUN_DEMO)],
        cwd=ROOT,
        env=demo_env(tmp_path, **{"DEMO_NO_ADMIN": "1", **settings}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )


def assert_nothing_lost_or_doubled(done: subprocess.CompletedProcess[str]) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(r"^\s*lost\s+0\b", done.stdout, re.MULTILINE), output
    assert re.search(r"^\s*doubled\s+0\b", done.stdout, re.MULTILINE), output
    assert re.search(r"crash_loop", done.stdout), output  # the poison product, dead


@pytest.mark.timeout(300)
def test_the_demo_reports_nothing_lost_or_doubled_and_exits_0(tmp_path: Path) -> None:
    done = run_demo(tmp_path, DEMO_ORDERS="120")
    assert_nothing_lost_or_doubled(done)
    # The faults it promises happened, on the local RabbitMQ.
    assert "broker amqp://" in done.stdout, done.stdout
    assert re.search(r"FAULT  SIGKILL to worker-\d", done.stdout), done.stdout
    assert "FAULT  stopping RabbitMQ" in done.stdout, done.stdout
    assert "RabbitMQ serves again" in done.stdout, done.stdout
    assert "skipped" not in done.stdout, done.stdout


@pytest.mark.timeout(300)
def test_the_demo_falls_back_to_the_embedded_transport_with_a_notice(tmp_path: Path) -> None:
    done = run_demo(tmp_path, DEMO_ORDERS="60", DEMO_BROKER="embedded")
    assert_nothing_lost_or_doubled(done)
    assert "NOTICE: DEMO_BROKER=embedded." in done.stdout, done.stdout
    assert "falls back to kombu's embedded filesystem:// transport" in done.stdout
    assert "FAULT  worker kill skipped" in done.stdout
    assert "FAULT  broker outage skipped: the embedded transport has no broker to stop" in (
        done.stdout
    )


class Output:
    """The demo's output, read line by line in a thread, so that the test can wait for a line
    (with a timeout) while the demo runs on, and the demo never blocks on a full pipe.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for text in stream:
            with self._changed:
                self.lines.append(text.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line that matches ``pattern``; fail when the demo ends or time runs out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for text in self.lines:
                    found = re.search(pattern, text)
                    if found:
                        return found
                left = deadline - time.monotonic()
                if self.ended or left <= 0:
                    why = "ended" if self.ended else f"ran {timeout:.0f} s"
                    pytest.fail(f"the demo {why} without printing {pattern!r}:\n{self.text}")
                self._changed.wait(left)

    def close(self, timeout: float) -> None:
        self._thread.join(timeout)


def process_table() -> dict[int, tuple[int, int, str]]:
    """Every process on this machine, from /proc: pid -> (parent pid, session id, state)."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        # "pid (command) state ppid pgrp session ...": the command may hold spaces and parentheses.
        state, ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        table[int(entry.name)] = (int(ppid), int(session), state)
    return table


def sessions_below(pid: int) -> set[int]:
    """The sessions of ``pid`` and of every process below it. The demo starts each service in a
    session of its own (a worker's pool processes share its session), so these are the demo's
    and one for each process it started.
    """
    table = process_table()
    tree = {pid}
    while grown := {p for p, (parent, _, _) in table.items() if parent in tree} - tree:
        tree |= grown
    return {table[p][1] for p in tree if p in table}


def left_in(sessions: set[int]) -> list[str]:
    """The processes still in ``sessions``, zombies included: "pid 123 (S) in session 120"."""
    return [
        f"pid {pid} ({state}) in session {session}"
        for pid, (_, session, state) in process_table().items()
        if session in sessions
    ]


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def log_in(admin_url: str, username: str, password: str) -> urllib.request.OpenerDirector:
    """Log in to Django's admin as a browser would: the login page's CSRF token, then the form.

    The standard library only (``requests`` is no dependency of the tests). The returned opener
    keeps the session cookie.
    """
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    login = f"{admin_url}login/?next=/admin/"
    with opener.open(login, timeout=10) as response:
        page = response.read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token, page
    form = {
        "csrfmiddlewaretoken": token[1],
        "username": username,
        "password": password,
        "next": "/admin/",
    }
    with opener.open(login, data=urlencode(form).encode(), timeout=10) as response:
        landed, page = response.url, response.read().decode()
    # A good login redirects to the admin's index; a bad one shows the login form again.
    assert landed == admin_url, f"login failed, landed on {landed}:\n{page}"
    return opener


@pytest.mark.timeout(300)
def test_the_demo_leaves_the_admin_running_and_ends_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """The report, then the admin with printed credentials shows the poison receipt's dead
    task; Ctrl-C (SIGINT to the demo's process group, as a terminal sends it) stops the admin,
    the relay and the workers, and the demo exits 0 with no process of it left.
    """
    env = demo_env(
        tmp_path,
        # The admin even under CI=true and with no terminal: the way a person runs the demo.
        DEMO_ADMIN="1",
        DEMO_PORT=str(unused_port()),
        # Nothing shared: the embedded broker (no RabbitMQ stopped), a cache in files.
        DEMO_BROKER="embedded",
        DEMO_CACHE_URL="",
        DEMO_ORDERS="40",
    )
    demo = subprocess.Popen(
        # Started with SIGINT ignored, as a shell starts a background job (`make demo &` in a
        # script): the demo must still take Ctrl-C. exec keeps the pid: it is the demo's.
        ["/bin/sh", "-c", 'trap "" INT; exec "$0" "$1"', sys.executable, str(RUN_DEMO)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A session of its own, as a terminal gives `make demo` a process group of its own.
        start_new_session=True,
    )
    assert demo.stdout is not None
    output = Output(demo.stdout)
    sessions: set[int] = set()
    try:
        admin_url = output.wait_for(
            r"Django's admin is running: (http://127\.0\.0\.1:\d+/admin/)$", 240
        )[1]
        username, password = output.wait_for(r"^\s+user (\S+), password (\S+)$", 5).groups()
        dead_tasks_url = output.wait_for(r"^   dead tasks   (http://\S+)$", 5)[1]
        assert dead_tasks_url == f"{admin_url}reliable_tasks/deadtask/"
        assert re.search(r"^\s*lost\s+0\b", output.text, re.MULTILINE), output.text

        opener = log_in(admin_url, username, password)
        with opener.open(dead_tasks_url, timeout=10) as response:
            status, page = response.status, response.read().decode()
        assert status == 200
        # One row per dead task: the poison product's receipt, dead of a crash loop.
        rows = re.findall(r'<tr[^>]*>\s*<td class="action-checkbox">.*?</tr>', page, re.DOTALL)
        assert rows, page
        assert any(
            "send_receipt</a>" in row
            and '<td class="field-reason">crash loop (delivered too often without an outcome)</td>'
            in row
            for row in rows
        ), page

        output.wait_for(r"Press Ctrl-C to stop the admin, the relay and the workers\.$", 10)
        sessions = sessions_below(demo.pid)
        # The demo's, the relay's, the two workers' and the admin's, at least.
        assert len(sessions) >= 5, (sessions, output.text)
        os.killpg(demo.pid, signal.SIGINT)
        try:
            code = demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo still ran 30 s after SIGINT:\n{output.text}")
        # Nothing of the demo is left once it exited: no process, not even a zombie, in its
        # session or in the sessions of what it started.
        left = left_in(sessions)
        assert not left, f"left behind by the demo: {left}\n{output.text}"
        for session in sessions:
            with pytest.raises(ProcessLookupError):
                os.killpg(session, 0)
    finally:
        if demo.poll() is None:
            # The test failed with the demo running: SIGTERM makes it stop what it started.
            demo.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                demo.wait(timeout=60)
        for session in sessions - {demo.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(session, signal.SIGKILL)
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        output.close(timeout=10)
        demo.stdout.close()

    text = output.text
    assert code == 0, f"exit code {code}:\n{text}"
    assert "Traceback" not in text, text
    assert "Interrupted." not in text, text  # an early Ctrl-C: exit code 130
    stopping = text[text.index("Press Ctrl-C") :]
    assert "   Ctrl-C: the demo ends." in stopping, text
    assert "8. Stopping the admin, the relay and the workers with SIGTERM" in stopping, text
    for name in ("relay", "worker-1", "worker-2", "admin"):
        assert re.search(rf"^   {name}\s+stopped\b", stopping, re.MULTILINE), text
    assert "OK: every order was charged once and got one receipt" in stopping, text


def test_the_embedded_transport_never_hands_a_worker_a_message_file_still_being_written(
    tmp_path: Path,
) -> None:
    """kombu writes a message's file in place, and a worker that took it meanwhile got it empty
    or cut short (its consumer died on "Expecting value", once in CI). The demo's transport
    writes the file whole before it has the name a worker looks for: here a process puts
    messages that take a while to encode while this one takes them as fast as it can, and every
    one arrives whole."""
    import queue as queues

    from kombu import Connection

    folder = tmp_path / "broker"
    folder.mkdir()
    count = 200
    writer = subprocess.Popen(
        [sys.executable, "-c", _PUT_MESSAGES, str(ROOT / "demo_project"), str(folder), str(count)]
    )
    module = _demo_transport()
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder)}
    taken: list[int] = []
    try:
        with Connection(
            "filesystem://", transport=module.Transport, transport_options=options
        ) as c:
            reader = c.channel()
            deadline = time.monotonic() + 120
            while len(taken) < count and time.monotonic() < deadline:
                try:
                    message = reader._get("q")
                except queues.Empty:
                    continue
                assert message["lines"] == _lines(), f"message {len(taken)} arrived cut short"
                taken.append(message["n"])
    finally:
        writer.kill()
        writer.wait()
    assert sorted(taken) == list(range(count))
    assert not list(folder.iterdir())  # nothing left behind, no ".part" file


def _lines() -> list[dict[str, object]]:
    """A message body JSON takes a while to encode (kombu encoded it with the file open)."""
    return [{"line": i, "sku": f"sku-{i}"} for i in range(5_000)]


def _demo_transport() -> Any:
    """The demo's transport module, loaded alone (the demo package would load its Celery app)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "demo_transport", ROOT / "demo_project" / "demo" / "transport.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PUT_MESSAGES = """
import importlib.util, sys
from kombu import Connection
root, folder, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = importlib.util.spec_from_file_location("demo_transport", root + "/demo/transport.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
lines = [{"line": i, "sku": f"sku-{i}"} for i in range(5_000)]
options = {"data_folder_in": folder, "data_folder_out": folder}
with Connection("filesystem://", transport=module.Transport, transport_options=options) as c:
    channel = c.channel()
    for n in range(count):
        channel._put("q", {"n": n, "lines": lines})
"""
