"""What every benchmark needs: services, a bench database, daphne, meters, tables.

A benchmark process configures Django for the bench database *before*
importing anything that touches models (call `setup_django()` first), seeds
rows with the ORM, starts daphne as a subprocess on the same database and
Redis with production settings, and then drives it with asyncio clients.

It never uses the test or development databases: PostgreSQL gets its own
database (BENCH_DATABASE_URL, dropped and created anew by each benchmark) and
Redis its own database number (BENCH_REDIS_URL), which is never flushed: the
channel layer's keys expire by themselves and nothing else is written there.
"""

import contextlib
import os
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

BASE_DIR = Path(__file__).resolve().parent.parent
BENCH_DATABASE_URL = os.environ.get(
    "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/archipelag_bench_web"
)
BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
# One secret key per run: sessions the bench signs in the bench process must
# verify in daphne, and nothing should ever accept the development key here.
SECRET_KEY = os.environ.get("BENCH_SECRET_KEY") or secrets.token_urlsafe(50)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Connections the kernel may queue for daphne to accept; see Daphne.endpoint.
LISTEN_BACKLOG = 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_workdir: Path | None = None


def workdir() -> Path:
    """A scratch directory for this run (logs, collected static files), removed at exit."""
    global _workdir
    if _workdir is None:
        _workdir = Path(tempfile.mkdtemp(prefix="archipelag-bench-"))
        if os.environ.get("BENCH_KEEP_LOGS") == "1":
            print(f"server logs are kept in {_workdir}", flush=True)
        else:
            import atexit

            atexit.register(shutil.rmtree, _workdir, ignore_errors=True)
    return _workdir


# --- Services and the bench database -------------------------------------------


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _wait_for(host: str, port: int, what: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not port_open(host, port):
        if time.monotonic() > deadline:
            sys.exit(f"{what} does not answer on {host}:{port}")
        time.sleep(0.2)


def ensure_services() -> None:
    """Start PostgreSQL and Redis on this machine when nothing answers, as .ci/run does.

    A service that already runs is used as it is and never stopped.
    """
    pg = urlsplit(BENCH_DATABASE_URL)
    pg_host, pg_port = pg.hostname or "127.0.0.1", pg.port or 5432
    if not port_open(pg_host, pg_port) and pg_host in {"127.0.0.1", "localhost"}:
        print("starting PostgreSQL", flush=True)
        version = sorted(os.listdir("/etc/postgresql"))[-1]
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=True)
        _wait_for(pg_host, pg_port, "PostgreSQL")
    redis = urlsplit(BENCH_REDIS_URL)
    redis_host, redis_port = redis.hostname or "127.0.0.1", redis.port or 6379
    if not port_open(redis_host, redis_port) and redis_host in {"127.0.0.1", "localhost"}:
        print("starting Redis", flush=True)
        os.makedirs("/var/lib/redis", exist_ok=True)
        command = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(redis_port)]
        subprocess.run([*command, "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis"], check=True)
        _wait_for(redis_host, redis_port, "Redis")


def recreate_database(url: str = BENCH_DATABASE_URL) -> None:
    """Drop and create the bench database, so every run starts from the same empty state."""
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name or "bench" not in name:
        # A guard against pointing BENCH_DATABASE_URL at real data by mistake.
        sys.exit(f"refusing to recreate database {name!r}: a bench database's name contains 'bench'")
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def raise_open_files_limit() -> int:
    """Raise this process's open-files limit to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def server_env(port: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a production-like server: DEBUG off, a real key, plain http on localhost."""
    public = f"http://127.0.0.1:{port}" if port else "http://127.0.0.1"
    env = {
        "DJANGO_SETTINGS_MODULE": "archipelag.settings",
        "DEBUG": "0",
        "SECRET_KEY": SECRET_KEY,
        "DATABASE_URL": BENCH_DATABASE_URL,
        "REDIS_URL": BENCH_REDIS_URL,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "PUBLIC_URL": public,
        # TLS is a proxy's job in production; the bench speaks plain http.
        "SECURE_SSL_REDIRECT": "0",
        "SESSION_COOKIE_SECURE": "0",
        "CSRF_COOKIE_SECURE": "0",
        "SECURE_HSTS_SECONDS": "0",
        "STATIC_ROOT": str(workdir() / "static"),
        "LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return env


def setup_django(migrate: bool = True) -> None:
    """Configure this process for the bench database and Redis, and migrate.

    Must run before anything imports models.
    """
    ensure_services()
    raise_open_files_limit()
    os.environ.update(server_env())
    if migrate:
        recreate_database()
    import django

    sys.path.insert(0, str(BASE_DIR))
    django.setup()
    if migrate:
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)
        call_command("collectstatic", verbosity=0, interactive=False)


# --- daphne --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daphne:
    """One daphne process serving `application` with production settings."""

    def __init__(
        self,
        application: str = "archipelag.asgi:application",
        name: str = "daphne",
        backlog: int = LISTEN_BACKLOG,
        **env: str,
    ):
        self.backlog = backlog
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.log = workdir() / f"{name}-{self.port}.log"
        self.application = application
        self.env = {**os.environ, **server_env(self.port), **env}
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "Daphne":
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "archipelag.server", "-e", self.endpoint, self.application],
                cwd=BASE_DIR,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                sys.exit(f"daphne did not start:\n{self.output()}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def endpoint(self) -> str:
        # `-b/-p` listen with Twisted's default backlog of 50 connections
        # waiting to be accepted; a burst of a few hundred websocket
        # handshakes overflows it and the kernel resets the rest.
        return f"tcp:port={self.port}:interface=127.0.0.1:backlog={self.backlog}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def count_in_log(self, *needles: str) -> dict[str, int]:
        text = self.output()
        return {needle: text.count(needle) for needle in needles}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the whole line (11 and 12 after the name).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all cores."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


@dataclass
class CpuShare:
    """Where the machine's CPU went during a measurement, in percent of all cores."""

    server: float
    client: float
    others: float
    busy: float
    # CPU seconds the server process used.
    server_seconds: float = 0.0

    def columns(self) -> list[str]:
        return [f"{self.server:.0f}%", f"{self.client:.0f}%", f"{self.others:.0f}%"]


def mean_share(shares: Sequence[CpuShare]) -> CpuShare:
    count = len(shares) or 1
    return CpuShare(
        server=sum(s.server for s in shares) / count,
        client=sum(s.client for s in shares) / count,
        others=sum(s.others for s in shares) / count,
        busy=sum(s.busy for s in shares) / count,
        server_seconds=sum(s.server_seconds for s in shares),
    )


class CpuMeter:
    """Measures CPU used by the server, this process (the load generator), and everything else."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.cores = os.cpu_count() or 1

    def __enter__(self) -> "CpuMeter":
        self._start = (
            process_cpu_seconds(self.server_pid),
            process_cpu_seconds(os.getpid()),
            *machine_cpu_seconds(),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        end = (
            process_cpu_seconds(self.server_pid),
            process_cpu_seconds(os.getpid()),
            *machine_cpu_seconds(),
        )
        server, client, busy, total = (b - a for a, b in zip(self._start, end, strict=True))
        total = total or 1e-9

        def pct(x: float) -> float:
            return 100 * x / total

        self.share = CpuShare(
            server=pct(server),
            client=pct(client),
            others=max(0.0, pct(busy - server - client)),
            busy=pct(busy),
            server_seconds=server,
        )


def load_average() -> str:
    with open("/proc/loadavg") as loadavg:
        return " ".join(loadavg.read().split()[:3])


# --- Numbers and tables ------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), nearest rank: an observed value, never an interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append([str(cell) for cell in cells])

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        widths = [max(len(h), *(len(row[i]) for row in self.rows)) for i, h in enumerate(self.headers)]

        def line(cells: Sequence[str]) -> str:
            return (
                "| "
                + " | ".join(
                    c.rjust(w) if i else c.ljust(w)
                    for i, (c, w) in enumerate(zip(cells, widths, strict=True))
                )
                + " |"
            )

        out = [
            f"\n### {self.title}\n",
            line(self.headers),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        ]
        out += [line(row) for row in self.rows]
        if self.notes:
            out.append("")
            out += self.notes
        return "\n".join(out)

    def print(self) -> None:
        print(self.render(), flush=True)


def machine_line() -> str:
    return f"machine: {os.cpu_count()} cores, load average {load_average()} (1, 5, 15 min)"


@contextlib.contextmanager
def stage(text: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"... {text}", end="", flush=True)
    yield
    print(f" ({time.monotonic() - started:.1f} s)", flush=True)


# --- Profiles ----------------------------------------------------------------------


def py_spy(pid: int, seconds: float, output: str) -> "subprocess.Popen[bytes]":
    """Sample `pid` with py-spy for `seconds`: only threads holding the GIL, as collapsed stacks."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: make bench installs it (pip install '.[bench]')")
    options = ["--duration", str(int(seconds)), "--rate", "100", "--gil", "--nonblocking", "--format", "raw"]
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), *options, "--output", output],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarize_profile(path: Path, top: int = 30) -> str:
    """The frames most often on the stack (inclusive), from py-spy's collapsed output."""
    import collections
    import re

    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    prefix = re.compile(r"\(/\S*?(site-packages|wt/\w+|lib/python3\.\d+)/")
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = {prefix.sub("(", frame) for frame in stack.split(";")}
        for frame in frames:
            inclusive[frame] += samples
    boring = ("threading.py", "asyncio/", "twisted/", "runpy", "daphne/cli", "daphne/__main__", "concurrent/")
    lines = [f"\n### Where daphne's CPU went (py-spy, GIL held, {total} samples; inclusive)\n"]
    for frame, samples in inclusive.most_common():
        if frame.startswith(("<module>", "_run")) or any(b in frame for b in boring):
            continue
        lines.append(f"{100 * samples / total:5.1f}%  {frame}")
        if len(lines) > top:
            break
    return "\n".join(lines)
