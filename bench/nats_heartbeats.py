"""Heartbeats per second through the NATS bridge into PostgreSQL, next to a raw baseline.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/archipelag_bench \\
    NATS_URL=nats://127.0.0.1:4222 .venv/bin/python bench/nats_heartbeats.py

What it does, all in one run:

1. Creates the database if needed, migrates it, and makes `--hosts` paired
   Islands (kept between runs).
2. Two baselines, psycopg alone, one heartbeat per Island in batches of
   `--batch-size`, the rows prepared before the clock starts:
   - the earlier one: lock the rows reading only their ids, one hand-written
     UPDATE ... FROM unnest(...) joining on host_id, commit. Kept for
     comparison with earlier runs; it is slower than the bridge's own SQL,
     so it is no floor;
   - the bridge's own SQL: its locking read of the columns a heartbeat reads
     and its UPDATE (Island.objects.heartbeat_lock and heartbeat_update), with
     the values it would write. The bridge's ratio to this one is its own
     overhead, Python per message (target: 0.9, issue 17).
3. The floor of any bridge on this machine: a process of its own receives
   the same round through nats-py as the bridge does, decodes each body with
   the bridge's decoder, and writes batches with the same-SQL baseline's
   prepared statements on as many connections as the bridge's writers. The
   bridge's ratio to it is what its own rules per batch cost.
4. Starts `manage.py nats_bridge` as a subprocess on that database (subjects
   under a prefix of its own), sends one untimed round so every Island is
   online, then publishes the timed round: one realistic EnhancedHeartbeat
   per Island, at full speed, and stops the clock when PostgreSQL holds all
   of them. One beat per host, so the bridge's latest-per-host merging
   cannot make the figure look better than the rows really written.

Each round is built before its clock starts and sent over a plain socket in
NATS' own protocol, so the benchmark's Python is not on the clock (building
50,000 heartbeats took 4 s, and was, until 2026-12-06).

Targets: 5,000 heartbeats/s (50,000 Islands at the agent's 10 s interval), and
0.9 of the same-SQL baseline.
"""

import argparse
import asyncio
import copy
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from islands.agent import REFERENCE_HEARTBEAT  # noqa: E402 (needs the path above)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/archipelag_bench"
HOST_PREFIX = "bench-host-"


def heartbeat(host_id: str, timestamp: int) -> dict[str, Any]:
    """The agent's full heartbeat (docs/api.md, the agent reference), with live-looking numbers."""
    rng = random.Random(f"{host_id}:{timestamp}")
    beat = copy.deepcopy(REFERENCE_HEARTBEAT)
    beat.update(host_id=host_id, timestamp=timestamp, active_jobs=rng.randint(0, 2), agent_version="0.5.0")
    beat["system"].update(
        cpu_percent=round(rng.uniform(1, 99), 1),
        memory_used_mb=rng.randint(2048, 30000),
        disk_used_gb=rng.randint(50, 400),
    )
    beat["gpus"][0].update(
        utilization_percent=rng.randint(0, 100),
        memory_used_mb=rng.randint(0, 24000),
        temperature_c=rng.randint(35, 85),
        power_draw_w=round(rng.uniform(20, 450), 1),
    )
    beat["active_job_metrics"][0].update(
        job_id=f"job-{rng.randint(1, 10**9)}",
        duration_ms=rng.randint(100, 60000),
        tokens_generated=rng.randint(1, 4000),
    )
    beat["performance_estimates"].update(
        nats_rtt_ms=round(rng.uniform(1, 80), 1), public_addr="203.0.113.7:5678"
    )
    return beat


def setup_django(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "archipelag.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()


def ensure_database(database_url: str) -> None:
    import psycopg

    name = database_url.rsplit("/", 1)[1].split("?")[0]
    admin_url = database_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


def ensure_islands(count: int) -> list[str]:
    from django.contrib.auth.models import User
    from django.core.management import call_command

    from islands.models import Island

    call_command("migrate", verbosity=0)
    owner, _ = User.objects.get_or_create(username="bench")
    hosts = [f"{HOST_PREFIX}{n:06d}" for n in range(count)]
    Island.objects.bulk_create(
        [Island(owner=owner, host_id=host, name=host) for host in hosts],
        batch_size=5000,
        ignore_conflicts=True,
    )
    return hosts


def count_at(database_url: str, timestamp: int) -> int:
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM islands_island WHERE host_id LIKE %s AND metrics->>'timestamp' = %s",
            [f"{HOST_PREFIX}%", str(timestamp)],
        ).fetchone()
    return int(row[0]) if row else 0


# --- The baseline: psycopg alone ------------------------------------------------------


BASELINE_COLUMNS = (
    "status, last_heartbeat_at, offline_after, metrics, supported_runtimes, asking_prices, agent_version, "
    "gpu_model, gpu_vram_mb, cpu_cores, ram_mb, region, device_model, os_version, runtime, accelerator"
)


# What a batch costs the database at best: the heartbeat's own columns taken
# as they come, the hardware ones kept where the heartbeat says nothing.
BASELINE_UPDATE = (
    f"UPDATE islands_island AS i SET ({BASELINE_COLUMNS}) = ("  # noqa: S608 (constants only)
    "v.status, v.last_heartbeat_at, v.offline_after, v.metrics, v.supported_runtimes, v.asking_prices, "
    "v.agent_version, COALESCE(NULLIF(v.gpu_model, ''), i.gpu_model), "
    "COALESCE(v.gpu_vram_mb, i.gpu_vram_mb), COALESCE(v.cpu_cores, i.cpu_cores), "
    "COALESCE(v.ram_mb, i.ram_mb), COALESCE(NULLIF(v.region, ''), i.region), "
    "COALESCE(NULLIF(v.device_model, ''), i.device_model), COALESCE(NULLIF(v.os_version, ''), i.os_version), "
    "COALESCE(NULLIF(v.runtime, ''), i.runtime), COALESCE(NULLIF(v.accelerator, ''), i.accelerator)) "
    "FROM unnest({arrays}) AS v({columns}) WHERE i.host_id = v.host_id AND i.removed_at IS NULL"
)


def baseline(database_url: str, hosts: list[str], batch_size: int, timestamp: int) -> float:
    """Heartbeats/s that psycopg alone writes: the same rows, the same batches, no Python per row."""
    import psycopg
    from psycopg.types.json import Jsonb

    now = datetime.now(UTC)
    rows = []
    for host in hosts:
        beat = heartbeat(host, timestamp)
        metrics = {
            key: beat[key] for key in ("active_jobs", "timestamp", "system", "gpus", "active_job_metrics")
        }
        rows.append(
            (
                host,
                "online",
                now,
                now + timedelta(seconds=45),
                Jsonb(metrics),
                Jsonb(beat["performance_estimates"]["supported_runtimes"]),
                Jsonb(beat["asking_prices"]),
                beat["agent_version"],
                "",
                beat["gpus"][0]["memory_total_mb"],
                None,
                beat["system"]["memory_total_mb"],
                "",
                "",
                "",
                "",
                "",
            )
        )
    # One array parameter per column, as the bridge's write path sends them.
    columns = ["host_id", *(name.strip() for name in BASELINE_COLUMNS.split(","))]
    types = [
        "varchar", "varchar", "timestamptz", "timestamptz", "jsonb", "jsonb", "jsonb", "varchar",
        "varchar", "int", "int", "int", "varchar", "varchar", "varchar", "varchar", "varchar",
    ]  # fmt: skip
    arrays = ", ".join(f"%s::{type_}[]" for type_ in types)
    # The bridge's connection options (JIT off), as same_sql_baseline uses:
    # earlier runs had JIT on here, one more way this baseline differed.
    started = time.perf_counter()
    with psycopg.connect(database_url, options=connection_options()) as conn:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            with conn.transaction():
                conn.execute(
                    "SELECT id FROM islands_island WHERE host_id = ANY(%s) AND removed_at IS NULL "
                    "ORDER BY id FOR NO KEY UPDATE",
                    [[row[0] for row in batch]],
                )
                conn.execute(
                    BASELINE_UPDATE.format(arrays=arrays, columns=", ".join(columns)),
                    [[row[index] for row in batch] for index in range(len(columns))],
                )
    elapsed = time.perf_counter() - started
    written = count_at(database_url, timestamp)
    if written != len(hosts):
        sys.exit(f"baseline wrote {written} of {len(hosts)} rows")
    return len(hosts) / elapsed


def prepare_same_sql(
    hosts: list[str], batch_size: int, timestamp: int
) -> list[tuple[list[str], str, list[Any], list[list[Any]]]]:
    """Per batch of `hosts`: the hosts, the locking read (SQL and parameters) and the UPDATE's columns.

    Everything Python does per row for the bridge's SQL (decoding, applying
    each beat, encoding the columns) is done here, before any clock starts.
    """
    import msgspec
    from django.db import transaction

    from islands.agent import EnhancedHeartbeat
    from islands.models import HEARTBEAT_READS, Island, offline_threshold

    now = datetime.now(UTC)
    threshold = offline_threshold()
    prepared: list[tuple[list[str], str, list[Any], list[list[Any]]]] = []
    for start in range(0, len(hosts), batch_size):
        batch = hosts[start : start + batch_size]
        beats = {
            host: msgspec.json.decode(msgspec.json.encode(heartbeat(host, timestamp)), type=EnhancedHeartbeat)
            for host in batch
        }
        with transaction.atomic():
            query = Island.objects.heartbeat_lock(set(), set(batch), now)
            sql, params = query.query.sql_with_params()
            islands = [Island.from_row("default", HEARTBEAT_READS, row) for row in query]
            for island in islands:
                island._apply_heartbeat(beats[island.host_id], now, threshold)
            prepared.append((batch, sql, list(params), Island.objects.heartbeat_columns(islands)))
            transaction.set_rollback(True)
    return prepared


def write_prepared(
    conn: Any, update: str, lock: str, lock_params: list[Any], columns: list[list[Any]]
) -> None:
    """One batch of the bridge's SQL, as psycopg alone sends it: the locking read, then the UPDATE."""
    import psycopg

    with conn.transaction():
        with psycopg.ClientCursor(conn) as cursor:
            cursor.execute(lock, lock_params)
            cursor.fetchall()
        conn.execute(update, columns)


def connection_options() -> str:
    """The bridge's connection options (JIT off), for psycopg alone."""
    from django.db import connection

    return str(connection.settings_dict.get("OPTIONS", {}).get("options", ""))


def same_sql_baseline(database_url: str, hosts: list[str], batch_size: int, timestamp: int) -> float:
    """Heartbeats/s that psycopg alone writes sending the bridge's own statements.

    Each batch is the bridge's locking read (Island.objects.heartbeat_lock,
    its SQL as Django sends it: values bound client-side) and its UPDATE
    (heartbeat_update, with heartbeat_columns as the parameters), on a
    connection with the bridge's options. Everything Python does per row
    (decoding, applying each beat, encoding the columns) is done before the
    clock starts, so the ratio of the bridge to this is the bridge's own
    overhead: the target (issue 17) is 0.9.
    """
    import psycopg

    from islands.models import Island

    prepared = prepare_same_sql(hosts, batch_size, timestamp)
    update = Island.objects.heartbeat_update()
    started = time.perf_counter()
    with psycopg.connect(database_url, options=connection_options()) as conn:
        for _, lock, lock_params, columns in prepared:
            write_prepared(conn, update, lock, lock_params, columns)
    elapsed = time.perf_counter() - started
    written = count_at(database_url, timestamp)
    if written != len(hosts):
        sys.exit(f"same-SQL baseline wrote {written} of {len(hosts)} rows")
    return len(hosts) / elapsed


# --- The floor of any bridge: nats-py, decoding, the same SQL --------------------------


def nats_floor(
    database_url: str, nats_url: str, hosts: list[str], batch_size: int, timestamp: int, writers: int
) -> tuple[float, float]:
    """Heartbeats/s, and CPU µs per heartbeat, of the least any bridge on nats-py must do.

    A process of its own subscribes as the bridge does (nats-py, a callback
    per message), reads each heartbeat's host from its subject and decodes its
    body with the bridge's own decoder and checks (decode_body, the agent's
    EnhancedHeartbeat), gathers batches of `batch_size` in arrival order and
    writes each with the same-SQL baseline's prepared statements on
    `writers` connections at once, as the bridge does. What it leaves out is
    the bridge's own work per batch: finding and locking the Islands through
    Django, applying each beat's rules, encoding the columns. The same
    publisher, the same round: so bridge / floor is what those rules cost, and
    floor / baseline is what receiving and decoding costs on this machine.
    """
    import pickle
    import select

    prepared = prepare_same_sql(hosts, batch_size, timestamp)
    prefix = f"benchfloor{uuid.uuid4().hex[:8]}."
    with tempfile.NamedTemporaryFile(suffix=".pickle") as batches:
        pickle.dump(prepared, batches)
        batches.flush()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.nats_heartbeats",
                "--floor-child",
                batches.name,
                "--writers",
                str(writers),
            ],
            cwd=BASE_DIR,
            env={**os.environ, "DATABASE_URL": database_url, "NATS_URL": nats_url, "FLOOR_PREFIX": prefix},
            stdout=subprocess.PIPE,
            text=True,
        )
        answers = process.stdout
        assert answers is not None

        def said(timeout: float) -> str:
            ready, _, _ = select.select([answers], [], [], timeout)
            return answers.readline().strip() if ready else ""

        try:
            frames = round_of(prefix, hosts, timestamp)
            if said(60) != "ready":
                sys.exit("the floor's subscriber did not start")
            started = time.perf_counter()
            asyncio.run(publish_round(nats_url, frames))
            outcome = said(300)
            elapsed = time.perf_counter() - started
        finally:
            process.terminate()
            process.wait(10)
    if not outcome.startswith("done "):
        sys.exit(f"the floor's subscriber failed: {outcome or 'no answer in 300 s'}")
    written = count_at(database_url, timestamp)
    if written != len(hosts):
        sys.exit(f"the floor wrote {written} of {len(hosts)} rows")
    return len(hosts) / elapsed, float(outcome.split()[1]) / len(hosts) * 1e6


def floor_process(path: str, writers: int) -> None:
    """nats_floor's subscriber, a process of its own: prints "ready", then "done <CPU seconds>"."""
    import pickle

    setup_django(os.environ["DATABASE_URL"])
    with open(path, "rb") as batches:
        prepared = pickle.load(batches)  # noqa: S301 (written by our own parent a moment ago)
    try:
        cpu = asyncio.run(
            _floor(
                os.environ["DATABASE_URL"],
                os.environ["NATS_URL"],
                os.environ["FLOOR_PREFIX"],
                writers,
                prepared,
            )
        )
    except Exception as exc:  # the parent reads one line: say what went wrong, not nothing
        print(f"failed: {type(exc).__name__}: {exc}", flush=True)
        return
    print(f"done {cpu}", flush=True)


async def _floor(
    database_url: str,
    nats_url: str,
    prefix: str,
    writers: int,
    prepared: list[tuple[list[str], str, list[Any], list[list[Any]]]],
) -> float:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import msgspec
    import nats
    import psycopg

    from archipelag.api import decode_body
    from archipelag.nats import Subjects
    from islands.agent import HEARTBEAT_MAX_BODY_BYTES, EnhancedHeartbeat
    from islands.models import Island

    update = Island.objects.heartbeat_update()
    subjects = Subjects(prefix)
    decoder = msgspec.json.Decoder(EnhancedHeartbeat)
    options = connection_options()
    local = threading.local()
    batches = iter(prepared)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(writers)
    pending: list[str] = []
    writes: list[asyncio.Future[None]] = []
    expected = sum(len(batch[0]) for batch in prepared)
    received = 0
    # Set when every heartbeat is in, or when something failed (in `problems`).
    all_in = asyncio.Event()
    problems: list[BaseException] = []

    def failed(future: "asyncio.Future[None]") -> None:
        problem = None if future.cancelled() else future.exception()
        if problem is not None:
            problems.append(problem)
            all_in.set()

    def write(hosts: list[str], batch: tuple[list[str], str, list[Any], list[list[Any]]]) -> None:
        # Batches form in arrival order, which is publish order from one publisher.
        if hosts != batch[0]:
            raise RuntimeError("a batch arrived out of publish order")
        if not hasattr(local, "conn"):
            local.conn = psycopg.connect(database_url, options=options)
        write_prepared(local.conn, update, *batch[1:])

    def flush() -> None:
        future = loop.run_in_executor(executor, write, pending.copy(), next(batches))
        future.add_done_callback(failed)
        writes.append(future)
        pending.clear()

    async def on_heartbeat(msg: Any) -> None:
        nonlocal received
        host_id = subjects.host_id(msg.subject, "heartbeat")
        if host_id is None:
            problems.append(RuntimeError(f"unexpected subject {msg.subject}"))
            all_in.set()
            return
        decode_body(msg.data, decoder, HEARTBEAT_MAX_BODY_BYTES)
        pending.append(host_id)
        received += 1
        if len(pending) == len(prepared[len(writes)][0]):
            flush()
        if received == expected:
            all_in.set()

    nc = await nats.connect(nats_url)
    await nc.subscribe(subjects.of_hosts("heartbeat"), queue="floor", cb=on_heartbeat)
    await nc.flush()
    print("ready", flush=True)
    cpu_before = time.process_time()
    await all_in.wait()
    if problems:
        raise problems[0]
    await asyncio.gather(*writes)
    cpu = time.process_time() - cpu_before
    await nc.close()
    executor.shutdown()
    return cpu


# --- Through the bridge -------------------------------------------------------------------


class BridgeProcess:
    def __init__(
        self,
        database_url: str,
        nats_url: str,
        prefix: str,
        batch_size: int,
        flush_ms: int,
        writers: int,
        log: Path,
    ):
        self.log = log
        # As in production: DEBUG=0, so Django does not keep every query in memory.
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "NATS_URL": nats_url,
            "LOG_LEVEL": "INFO",
            "DEBUG": "0",
        }
        with log.open("wb") as sink:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "manage.py",
                    "nats_bridge",
                    "--subject-prefix",
                    prefix,
                    "--batch-size",
                    str(batch_size),
                    "--flush-ms",
                    str(flush_ms),
                    # Its counters, 20 times a second, tell the benchmark when
                    # the round is written (see applied()).
                    "--stats-interval",
                    "0.05",
                    "--writers",
                    str(writers),
                ],
                cwd=BASE_DIR,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while "event=bridge_ready" not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                sys.exit(f"the bridge did not start:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def applied(self) -> int:
        """Heartbeats the bridge has committed so far, from its latest counters line."""
        with self.log.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 8192))
            tail = log.read().decode(errors="replace")
        found = re.findall(r"event=bridge_stats .*?heartbeats_applied=(\d+)", tail)
        return int(found[-1]) if found else 0

    def cpu_seconds(self) -> float:
        """CPU time the bridge used so far (user + system), from /proc."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> dict[str, int]:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        match = re.search(r"event=bridge_stopped (.*)", self.output())
        if not match:
            return {}
        return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def round_of(prefix: str, hosts: list[str], timestamp: int) -> bytes:
    """One heartbeat per host as NATS protocol (PUB lines with their payloads), built before any clock starts.

    Building 50,000 realistic heartbeats takes seconds of Python: inside the
    timed window (as until 2026-12-06) the bridge waited for it, idle.
    """
    frames = []
    for host in hosts:
        payload = json.dumps(heartbeat(host, timestamp)).encode()
        frames.append(
            b"PUB %shost.%s.heartbeat %d\r\n%s\r\n" % (prefix.encode(), host.encode(), len(payload), payload)
        )
    return b"".join(frames)


async def publish_round(nats_url: str, frames: bytes) -> float:
    """Send a round_of() to NATS as fast as the server reads it; the seconds until it has taken all of it.

    A plain socket speaking NATS' text protocol: a client library's Python
    per message would be the benchmark's own load on the two cores it shares
    with the bridge, where the Islands publishing in production are machines
    of their own. The server answers the PING after the last PUB only once
    it has processed every one of them.
    """
    from urllib.parse import urlsplit

    url = urlsplit(nats_url)
    reader, writer = await asyncio.open_connection(url.hostname or "127.0.0.1", url.port or 4222)
    try:
        info = await reader.readline()
        if not info.startswith(b"INFO "):
            raise RuntimeError(f"not a NATS server: {info[:80]!r}")
        connect: dict[str, Any] = {"verbose": False, "pedantic": False, "name": "bench-publisher"}
        if url.username:
            connect.update(user=url.username, **{"pass": url.password or ""})
        writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        await _pong(reader)
        started = time.perf_counter()
        writer.write(frames)
        writer.write(b"PING\r\n")
        await writer.drain()
        await _pong(reader)
        return time.perf_counter() - started
    finally:
        writer.close()
        await writer.wait_closed()


async def _pong(reader: asyncio.StreamReader) -> None:
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout=300)
        if line == b"PONG\r\n":
            return
        if not line or line.startswith(b"-ERR"):
            raise RuntimeError(f"NATS refused the round: {line.strip()!r}")


def through_bridge(
    database_url: str,
    nats_url: str,
    hosts: list[str],
    batch_size: int,
    flush_ms: int,
    timestamp: int,
    bridges: int,
    writers: int,
    profile: str | None = None,
) -> tuple[float, float, dict[str, int]]:
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    logs = [Path(tempfile.gettempdir()) / f"nats-bridge-{prefix.rstrip('.')}-{n}.log" for n in range(bridges)]
    # Several bridges share the subjects as one queue group, as in production.
    running = [
        BridgeProcess(database_url, nats_url, prefix, batch_size, flush_ms, writers, log) for log in logs
    ]
    try:
        # Untimed: every Island comes online once, so the timed round is the
        # steady state (no status changes to insert).
        asyncio.run(publish_round(nats_url, round_of(prefix, hosts, timestamp - 1)))
        wait_until_applied(running, len(hosts))
        wait_until_written(database_url, timestamp - 1, len(hosts))

        frames = round_of(prefix, hosts, timestamp)
        spy = start_profile(running[0].process.pid, profile) if profile else None
        cpu_before = sum(bridge.cpu_seconds() for bridge in running)
        started = time.perf_counter()
        publish_seconds = asyncio.run(publish_round(nats_url, frames))
        wait_until_applied(running, 2 * len(hosts))
        elapsed = time.perf_counter() - started
        # The counters say when; the database says whether: every timed beat is there.
        wait_until_written(database_url, timestamp, len(hosts), timeout=10)
        cpu = sum(bridge.cpu_seconds() for bridge in running) - cpu_before
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    finally:
        counters: dict[str, int] = {}
        for bridge in running:
            for name, count in bridge.stop().items():
                counters[name] = counters.get(name, 0) + count
        # The bridges made a stream of AssignJobs named after the prefix; it outlives them.
        asyncio.run(delete_stream(nats_url, prefix))
    print(f"  bridge logs: {' '.join(str(log) for log in logs)}")
    counters["cpu_microseconds_per_heartbeat"] = int(cpu / len(hosts) * 1e6)
    return len(hosts) / elapsed, len(hosts) / publish_seconds, counters


def start_profile(pid: int, output: str) -> "subprocess.Popen[bytes]":
    """py-spy on the bridge during the timed round (all its threads, not only the GIL holder's)."""
    import shutil

    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: make bench installs it (pip install '.[bench]')")
    options = ["--duration", "600", "--rate", "200", "--gil", "--nonblocking", "--format", "raw"]
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), *options, "--output", output],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def delete_stream(nats_url: str, prefix: str) -> None:
    import nats
    import nats.js.errors

    from archipelag.nats import default_stream

    nc = await nats.connect(nats_url)
    try:
        await nc.jsm().delete_stream(default_stream(prefix))
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await nc.close()


def wait_until_applied(running: list[BridgeProcess], expected: int, timeout: float = 300) -> None:
    """Wait until the bridges' counters say `expected` heartbeats are committed.

    Asking PostgreSQL instead (count_at, a scan of every Island's JSON)
    took over 100 ms a time here: polled every 50 ms, it kept a core busy
    and halved the bridge it was timing.
    """
    deadline = time.monotonic() + timeout
    while sum(bridge.applied() for bridge in running) < expected:
        if time.monotonic() > deadline:
            applied = sum(bridge.applied() for bridge in running)
            sys.exit(f"the bridges applied {applied} of {expected} in {timeout:g} s")
        time.sleep(0.02)


def wait_until_written(database_url: str, timestamp: int, expected: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while count_at(database_url, timestamp) < expected:
        if time.monotonic() > deadline:
            sys.exit(
                f"only {count_at(database_url, timestamp)} of {expected} heartbeats arrived in {timeout:g} s"
            )
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", type=int, default=50_000, help="Paired Islands, one timed heartbeat each.")
    parser.add_argument(
        "--batch-size", type=int, default=500, help="The bridge's batch size, and the baseline's."
    )
    parser.add_argument("--flush-ms", type=int, default=250, help="The bridge's flush interval.")
    parser.add_argument(
        "--bridges", type=int, default=1, help="Bridge processes sharing the load (queue group)."
    )
    parser.add_argument("--writers", type=int, default=2, help="Batches each bridge writes at once.")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="sample the (first) bridge with py-spy during the timed round; print where its time went",
    )
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument("--floor-child", metavar="BATCHES", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_child:
        floor_process(args.floor_child, args.writers)
        return
    if not args.database_url.startswith(("postgres://", "postgresql://")):
        sys.exit("the benchmark needs PostgreSQL: set DATABASE_URL=postgres://...")

    ensure_database(args.database_url)
    setup_django(args.database_url)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    hosts = ensure_islands(args.hosts)
    stamp = int(time.time() * 1000)

    earlier = baseline(args.database_url, hosts, args.batch_size, stamp)
    raw = same_sql_baseline(args.database_url, hosts, args.batch_size, stamp + 5)
    floor, floor_cpu = nats_floor(
        args.database_url, args.nats_url, hosts, args.batch_size, stamp + 7, args.writers
    )
    bridged, published, counters = through_bridge(
        args.database_url,
        args.nats_url,
        hosts,
        args.batch_size,
        args.flush_ms,
        stamp + 10,
        args.bridges,
        args.writers,
        args.profile,
    )
    batches = counters.get("heartbeat_batches", 0)
    applied = counters.get("heartbeats_applied", 0)
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"hosts: {len(hosts)}, one heartbeat each per round, batch size {args.batch_size}, "
        f"{args.bridges} bridge process{'es' if args.bridges > 1 else ''}"
    )
    print(f"  published into NATS:             {published:>9,.0f} heartbeats/s")
    print(f"  bridge, end to end to PostgreSQL: {bridged:>8,.0f} heartbeats/s")
    print(f"  psycopg alone, the bridge's SQL:  {raw:>8,.0f} heartbeats/s (the baseline)")
    print(
        f"  nats-py + decoding + that SQL:    {floor:>8,.0f} heartbeats/s (the floor of any bridge here: "
        f"{floor / raw:.2f} of the baseline, {floor_cpu:.0f} µs CPU per heartbeat)"
    )
    print(f"  psycopg alone, earlier SQL:       {earlier:>8,.0f} heartbeats/s (ids-only lock, own UPDATE)")
    ratio = bridged / raw
    print(f"  bridge / floor: {bridged / floor:.2f} (what the bridge's own rules per batch cost)")
    print(
        f"  bridge / baseline: {ratio:.2f} (target ≥ 0.9) {'met' if ratio >= 0.9 else 'NOT MET'}; "
        f"target 5,000/s: {'met' if bridged >= 5000 else 'NOT met'}"
    )
    cpu_per_beat = counters["cpu_microseconds_per_heartbeat"]
    print(
        f"  bridge CPU per heartbeat (timed round): {cpu_per_beat} µs, so a bridge process "
        f"tops out near {1e6 / max(cpu_per_beat, 1):,.0f}/s on a core of its own"
    )
    if batches:
        print(
            f"  bridge counters (both rounds): {applied:,} applied in {batches:,} batches "
            f"(average {applied / batches:,.0f}), {counters.get('heartbeats_superseded', 0)} superseded, "
            f"{counters.get('heartbeats_not_applied', 0)} not applied"
        )
    if args.profile and Path(args.profile).exists():
        from bench.common import summarize_profile

        print(summarize_profile(Path(args.profile), top=40).replace("daphne", "the bridge"), flush=True)


if __name__ == "__main__":
    main()
