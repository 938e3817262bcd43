"""What the fault tests break, and the processes they break.

Every process a fault test stops, kills or cuts off is one it started: a
redis-server and a nats-server on spare ports, daphne, `watch_islands` and
`nats_bridge` as subprocesses on the test database, and a TCP proxy in front
of PostgreSQL. The machine's PostgreSQL, Redis and NATS servers are never
stopped, and the only PostgreSQL backends ever terminated are those of a
process under test, matched by the test database's name and an
application_name given to that process alone (PGAPPNAME).

The subprocesses share the test database with the test, which needs
PostgreSQL: the embedded run (SQLite) skips these tests, saying so, and
.ci/run's second run runs them. docs/faults.md describes each fault.
"""

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.db.models import Model
from django.utils import timezone

from islands.models import Island
from tests.conftest import BASE_DIR, _free_port, _reachable, daphne_args

REDIS_SERVER = "/usr/bin/redis-server"
NATS_SERVER = "/usr/sbin/nats-server"


def wait_for(condition: Callable[[], Any], timeout: float = 90, what: str = "the condition") -> Any:
    """Poll `condition` until it returns something true; fail after `timeout` seconds.

    Timeouts are generous on purpose: these tests share two cores with
    PostgreSQL and every process they start. A timeout is a failure, never
    an assertion about speed.
    """
    deadline = time.monotonic() + timeout
    while True:
        if result := condition():
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def silent_islands(owner: User, count: int, silent_for: timedelta) -> list[Island]:
    """Islands recorded online whose heartbeat deadline passed `silent_for` ago, oldest first.

    What the watcher finds after Islands stop beating: each is due one
    silence, dated at its deadline. Deadlines are a millisecond apart, so the
    watcher's order (oldest deadline first) is this list's.
    """
    now = timezone.now()
    tag = uuid.uuid4().hex[:8]
    islands = []
    for n in range(count):
        deadline = now - silent_for - timedelta(milliseconds=count - n)
        islands.append(
            Island(
                owner=owner,
                host_id=f"silent-{tag}-{n:05d}",
                name=f"Silent {n}",
                status=Island.Status.ONLINE,
                last_heartbeat_at=deadline - timedelta(seconds=45),
                offline_after=deadline,
            )
        )
    return Island.objects.bulk_create(islands)


# --- PostgreSQL -------------------------------------------------------------------------


def database_url(host: str | None = None, port: int | None = None) -> str:
    """The test database's URL, optionally through another host and port (a proxy)."""
    db = connection.settings_dict
    user = quote(db.get("USER") or "postgres")
    password = f":{quote(db['PASSWORD'])}" if db.get("PASSWORD") else ""
    host = host or db.get("HOST") or "127.0.0.1"
    port = port or int(db.get("PORT") or 5432)
    return f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"


def backends(app_name: str) -> set[int]:
    """Pids of the PostgreSQL backends the process named `app_name` holds on the test database.

    Read in autocommit: within one transaction PostgreSQL answers every read
    of pg_stat_activity from the snapshot it took first.
    """
    assert connection.get_autocommit(), "pg_stat_activity is a snapshot inside a transaction"
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            [connection.settings_dict["NAME"], app_name],
        )
        return {row[0] for row in cursor.fetchall()}


def waiting_on_a_lock(app_name: str) -> bool:
    """Whether a backend of the process named `app_name` waits for a lock."""
    assert connection.get_autocommit(), "pg_stat_activity is a snapshot inside a transaction"
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = %s AND wait_event_type = 'Lock'",
            [connection.settings_dict["NAME"], app_name],
        )
        row = cursor.fetchone()
        return bool(row and row[0])


@contextmanager
def row_locked(instance: Model) -> Iterator[None]:
    """Hold a row lock on `instance` from a connection of its own, so a process under
    test that writes the row waits, mid-request or mid-step, until the block ends."""
    db = connection.settings_dict
    with psycopg.connect(
        host=db.get("HOST") or "127.0.0.1",
        port=int(db.get("PORT") or 5432),
        user=db.get("USER") or "postgres",
        password=db.get("PASSWORD") or None,
        dbname=db["NAME"],
        application_name="faults-lock-holder",
    ) as holder:
        table = instance._meta.db_table
        holder.execute(f'SELECT 1 FROM "{table}" WHERE id = %s FOR UPDATE', [instance.pk])  # noqa: S608
        yield
        holder.rollback()


def terminate_backends(app_name: str) -> set[int]:
    """pg_terminate_backend() the backends of one process under test, and only those.

    The call sits in the SELECT list, which PostgreSQL evaluates only for
    rows that passed the WHERE clause. In the WHERE clause itself it could
    be evaluated before the other conditions (PostgreSQL pushes it down to
    the scan of all backends, ahead of the database filter) and terminate
    backends of any database on the server. Each pid is checked again by
    name and database as it is terminated.
    """
    assert connection.get_autocommit(), "pg_stat_activity is a snapshot inside a transaction"
    name = connection.settings_dict["NAME"]
    terminated: set[int] = set()
    for pid in backends(app_name):
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid = %s AND datname = %s AND application_name = %s AND pid <> pg_backend_pid()",
                [pid, name, app_name],
            )
            if any(row[0] for row in cursor.fetchall()):
                terminated.add(pid)
    return terminated


class TcpProxy:
    """A TCP proxy in front of PostgreSQL that the test can cut, as a restart would.

    `cut()` closes every connection through it (the client sees the server
    hang up; its backend ends as the client went away). `down()` also stops
    listening, so new connections are refused until `up()`: PostgreSQL as its
    clients see it while it restarts.
    """

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = _free_port()
        self.accepted = 0
        self._links: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.up()

    def up(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        listener.settimeout(0.1)
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._acceptor.start()

    def down(self) -> None:
        self._listener = None
        if self._acceptor is not None:
            self._acceptor.join(5)
        self.cut()

    def cut(self) -> int:
        """Close every connection through the proxy; return how many there were."""
        with self._lock:
            links = list(self._links)
        for sock in links:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return len(links) // 2

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while self._listener is listener:
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    client.close()
                    continue
                client.settimeout(None)
                upstream.settimeout(None)
                with self._lock:
                    self.accepted += 1
                    self._links.update((client, upstream))
                threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while True:
                readable, _, _ = select.select([client, upstream], [], [])
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._links.difference_update((client, upstream))
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@pytest.fixture
def pg_proxy(faults: None) -> Iterator[TcpProxy]:
    db = connection.settings_dict
    proxy = TcpProxy((db.get("HOST") or "127.0.0.1", int(db.get("PORT") or 5432)))
    yield proxy
    proxy.down()


# --- Processes ----------------------------------------------------------------------------


class Process:
    """A subprocess under test, its output in a log file of its own."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path):
        self.name = name
        self.log = log
        with log.open("wb") as sink:
            self.popen = subprocess.Popen(args, cwd=BASE_DIR, env=env, stdout=sink, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for_log(self, text: str, timeout: float = 30, count: int = 1) -> None:
        def seen() -> bool:
            if not self.alive:
                pytest.fail(f"{self.name} exited with {self.popen.returncode}:\n{self.output()}")
            return self.output().count(text) >= count

        wait_for(seen, timeout, what=f"{text!r} in the log of {self.name}:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed, open transactions roll back."""
        self.popen.kill()
        self.popen.wait(10)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.popen.send_signal(signum)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            pytest.fail(f"{self.name} did not stop within {timeout} s:\n{self.output()[-3000:]}")


def bridge_counters(output: str, event: str = "bridge_stopped") -> dict[str, int]:
    """The counters of the bridge's last `event=bridge_stats` or `event=bridge_stopped` line."""
    line = [line for line in output.splitlines() if f"event={event} " in line][-1]
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line)}


def django_env(app_name: str, **overrides: str) -> dict[str, str]:
    """The environment of a process under test: the test database, and a name in pg_stat_activity."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "DJANGO_SETTINGS_MODULE": "archipelag.settings",
        "PYTHONUNBUFFERED": "1",
        # libpq's application_name: what terminate_backends() matches on.
        "PGAPPNAME": app_name,
        **overrides,
    }
    # The browser fixture allows sync ORM calls in this process only; the
    # servers under test must run as in production.
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    return env


class Spawner:
    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.started: list[Process] = []

    def __call__(self, name: str, args: list[str], env: dict[str, str]) -> Process:
        log = self.tmp_path / f"{len(self.started):02d}-{name}.log"
        process = Process(name, args, env, log)
        self.started.append(process)
        return process

    def command(self, name: str, *args: str, app_name: str | None = None, **env: str) -> Process:
        """`manage.py <args>` on the test database."""
        app_name = app_name or f"faults-{name}-{uuid.uuid4().hex[:8]}"
        return self(name, [sys.executable, "manage.py", *args], django_env(app_name, **env))

    def daphne(self, app_name: str | None = None, **env: str) -> "Daphne":
        """daphne serving the app on a spare port, as the Dockerfile runs it."""
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        app_name = app_name or f"faults-daphne-{uuid.uuid4().hex[:8]}"
        process = self(
            "daphne",
            daphne_args(port),
            django_env(app_name, PUBLIC_URL=url, DEBUG="1", **env),
        )

        def listening() -> bool:
            if not process.alive:
                pytest.fail(f"daphne did not start:\n{process.output()}")
            return _reachable(url, port)

        wait_for(listening, what=f"daphne to listen on port {port}")
        return Daphne(url, process, app_name)


class Daphne:
    def __init__(self, url: str, process: Process, app_name: str):
        self.url = url
        self.process = process
        self.app_name = app_name


@pytest.fixture
def faults(postgres: None, transactional_db: None) -> None:
    """What every fault test needs: PostgreSQL, with its data committed for the subprocesses."""


@pytest.fixture
def spawn(faults: None, tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path)
    yield spawner
    # Before the test database is flushed: a process still connected would block it.
    for process in spawner.started:
        if process.alive:
            process.kill()


# --- Redis and NATS of the test's own ----------------------------------------------------------


class RedisServer:
    """A redis-server on a spare port, which the test may stop and start again on that port."""

    def __init__(self, log: Path):
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.popen = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: _reachable(self.url, self.port), what=f"redis-server on {self.port}")

    def stop(self) -> None:
        assert self.popen is not None
        self.popen.terminate()
        self.popen.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: connections are still accepted (by the kernel), and never answered."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGCONT)


@pytest.fixture
def redis_server(faults: None, tmp_path: Path) -> Iterator[RedisServer]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip(f"needs the redis-server binary at {REDIS_SERVER} to stop and start a Redis of its own")
    server = RedisServer(tmp_path / "redis-server.log")
    server.start()
    yield server
    if server.popen is not None and server.popen.poll() is None:
        server.thaw()
        server.popen.kill()
        server.popen.wait()


class NatsServer:
    """A nats-server on a spare port (core NATS, as the agent's subjects use it)."""

    def __init__(self, log: Path):
        self.port = _free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.log = log
        with log.open("ab") as sink:
            self.popen = subprocess.Popen(
                [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port)], stdout=sink, stderr=subprocess.STDOUT
            )
        wait_for(lambda: "Server is ready" in log.read_text(errors="replace"), what="nats-server")


@pytest.fixture
def nats_server(faults: None, tmp_path: Path) -> Iterator[NatsServer]:
    if not Path(NATS_SERVER).exists():
        pytest.skip(f"needs the nats-server binary at {NATS_SERVER} to run a NATS of its own")
    server = NatsServer(tmp_path / "nats-server.log")
    yield server
    server.popen.kill()
    server.popen.wait()
