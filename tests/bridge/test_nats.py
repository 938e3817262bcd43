"""The NATS bridge against a real nats-server, spoken to as the real agent speaks.

These need NATS_URL (the embedded test run skips them, saying so; .ci/run
sets it). Each test's bridge and agent use subjects under a prefix of their
own, so test runs sharing the machine's server never hear each other. The
tests that stop NATS start a nats-server of their own on a spare port.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from django.utils import timezone

from archipelag.nats import Bridge, Subjects, default_stream
from islands.models import Island, Job
from pairing.models import PairingCode
from tests.conftest import BASE_DIR, CAPABILITIES, HOST_ID, _free_port, _test_database_url
from tests.islands.conftest import AGENT_HEARTBEAT, give_job, make_island

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def wait_for(condition: Callable[[], Any], timeout: float = 30, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


class Agent:
    """Stands in for the Island agent: a nats-py client on an event loop of its own."""

    def __init__(self, url: str, subjects: Subjects, host_id: str = HOST_ID):
        self.subjects = subjects
        self.host_id = host_id
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nc = self._run(nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2))

    def _run(self, coro: Any, timeout: float = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @staticmethod
    def _body(payload: Any) -> bytes:
        return payload if isinstance(payload, bytes) else json.dumps(payload).encode()

    def publish(self, subject: str, payload: Any) -> None:
        async def send() -> None:
            await self.nc.publish(subject, self._body(payload))
            await self.synced()

        self._run(send())

    async def synced(self) -> None:
        """Return once the server has taken everything published so far.

        nats-py's flush() writes its PING ahead of publishes still queued in
        the client, so it can return early; a message to ourselves cannot
        overtake the ones queued before it.
        """
        echo = f"{self.subjects.prefix}test.synced.{uuid.uuid4().hex}"
        sub = await self.nc.subscribe(echo, max_msgs=1)
        await self.nc.publish(echo, b"")
        await sub.next_msg(timeout=20)

    def request(self, subject: str, payload: Any, timeout: float = 10) -> bytes:
        return bytes(self._run(self.nc.request(subject, self._body(payload), timeout=timeout)).data)

    def ask_for_code(self) -> dict[str, Any]:
        """What the agent does once per start when it is not paired."""
        self.publish(
            self.subjects.register,
            {"host_id": self.host_id, "capabilities": CAPABILITIES, "version": "0.5.0"},
        )
        return json.loads(self.request(self.subjects.pairing, {"host_id": self.host_id}))  # type: ignore[no-any-return]

    def send(self, kind: str, payload: Any, host_id: str | None = None) -> None:
        self.publish(self.subjects.of_host(host_id or self.host_id, kind), payload)

    def close(self) -> None:
        self._run(self.nc.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def fresh_prefix() -> str:
    return f"test{uuid.uuid4().hex[:12]}."


def delete_stream(url: str, name: str) -> None:
    """Delete a stream a test's bridge made (they are named after the test's prefix), if it is there.

    JetStream streams outlive their clients on the shared server; every
    test deletes the ones its bridges created.
    """

    async def delete() -> None:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError, nats.js.errors.ServiceUnavailableError):
                await nc.jsm().delete_stream(name)
        finally:
            await nc.close()

    with contextlib.suppress(OSError, nats.errors.NoServersError):
        asyncio.run(delete())


def run_bridge(bridge: Bridge) -> threading.Thread:
    thread = threading.Thread(target=asyncio.run, args=(bridge.run(),), daemon=True)
    thread.start()
    assert bridge.ready.wait(15), "the bridge did not subscribe within 15 s"
    return thread


def stop_bridge(bridge: Bridge, thread: threading.Thread) -> None:
    bridge.stop_threadsafe()
    thread.join(20)
    assert not thread.is_alive(), "the bridge did not stop within 20 s"


@pytest.fixture
def bridge(nats_url: str, transactional_db: None) -> Iterator[Bridge]:
    """A bridge in this process (its own event loop thread), on the test database.

    Its stream of AssignJobs is named after its prefix, and deleted after.
    """
    bridge = Bridge(
        [nats_url], prefix=fresh_prefix(), flush_interval=0.05, stats_interval=3600, outbox_poll=0.1
    )
    thread = run_bridge(bridge)
    yield bridge
    stop_bridge(bridge, thread)
    delete_stream(nats_url, bridge.stream)


@pytest.fixture
def agent(nats_url: str, bridge: Bridge) -> Iterator[Agent]:
    agent = Agent(nats_url, bridge.subjects)
    yield agent
    agent.close()


# --- Pairing and registration ---------------------------------------------------------


def test_pairing_round_trip_over_nats_and_the_pair_page(agent, alice, alice_client, bridge):
    answer = agent.ask_for_code()
    assert answer["success"] is True
    assert set(answer) == {"success", "code", "expires_in_seconds", "pair_url"}
    assert answer["expires_in_seconds"] == 600
    assert answer["pair_url"].endswith("/pair")

    page = alice_client.post("/pair", {"code": answer["code"]}).content.decode()
    # From the registration the agent sent first.
    assert "RTX 4090, 24 GB VRAM" in page, page[page.find("<main") :]
    assert alice_client.post("/pair/confirm", {"code": answer["code"]}).status_code == 302
    island = Island.objects.get(host_id=HOST_ID)
    assert (island.owner, island.gpu_model, island.agent_version) == (alice, "RTX 4090", "0.5.0")

    # The agent's next start: it matches this exact text and stops asking.
    again = json.loads(agent.request(agent.subjects.pairing, {"host_id": HOST_ID}))
    assert again == {"success": False, "error": "already paired"}
    assert bridge.counters["pairing_issued"] == 1
    assert bridge.counters["pairing_already_paired"] == 1


def test_pairing_answers_well_within_the_agents_timeout(agent):
    started = time.monotonic()
    assert agent.ask_for_code()["success"] is True
    assert time.monotonic() - started < 2


def test_registration_updates_a_paired_islands_hardware(agent, alice, bridge):
    island = make_island(alice, gpu_model="RTX 3060", agent_version="0.4.0")
    agent.publish(
        agent.subjects.register,
        {"host_id": HOST_ID, "capabilities": {**CAPABILITIES, "gpu_vram_mb": None}, "version": "0.5.0"},
    )
    wait_for(lambda: bridge.counters["register_linked"] == 1, what="the registration")
    island.refresh_from_db()
    assert (island.gpu_model, island.gpu_vram_mb, island.agent_version) == ("RTX 4090", 24576, "0.5.0")


# --- Heartbeats ---------------------------------------------------------------------


def test_heartbeats_make_a_paired_island_online_and_drop_unknown_hosts(agent, island, bridge):
    assert island.status_at(timezone.now()) == Island.LiveStatus.NEW
    agent.send("heartbeat", AGENT_HEARTBEAT)
    agent.send("heartbeat", {**AGENT_HEARTBEAT, "host_id": "unpaired-host-1"}, host_id="unpaired-host-1")

    wait_for(lambda: Island.objects.get(pk=island.pk).last_heartbeat_at, what="the heartbeat")
    island.refresh_from_db()
    assert island.status_at(timezone.now()) == Island.LiveStatus.ONLINE
    assert island.agent_version == "0.4.0"
    assert island.supported_runtimes == ["container", "wasm"]
    assert island.metrics["gpus"][0]["temperature_c"] == 72
    wait_for(lambda: bridge.counters["heartbeats_not_applied"] == 1, what="the unknown host to be counted")
    assert island.status_changes.get().reason == "first_heartbeat"


def test_a_heartbeat_naming_another_host_in_its_body_is_dropped(agent, island, bridge, bob):
    other = make_island(bob, host_id="bobs-host-0001")
    agent.send("heartbeat", {**AGENT_HEARTBEAT, "host_id": other.host_id})
    wait_for(lambda: bridge.counters["rejected_heartbeat_host_mismatch"] == 1, what="the mismatch")
    assert Island.objects.filter(last_heartbeat_at__isnull=False).count() == 0


# --- Job states and leases -----------------------------------------------------------


def test_statuses_update_the_ledger_exactly_once_under_redelivery(agent, island, bridge):
    give_job(
        island=island, job_id="j1", workload="llm-chat", credits=Decimal("2.5"), lease=timedelta(minutes=5)
    )
    for state in ("started", "streaming", "succeeded", "succeeded", "failed"):
        agent.send("status", {"job_id": "j1", "state": state, "timestamp": 1710000000000})
    wait_for(lambda: bridge.counters["statuses_received"] == 5, what="five statuses")
    wait_for(
        lambda: sum(v for k, v in bridge.counters.items() if k.startswith("status_")) == 5, what="handling"
    )

    job = Job.objects.get(job_id="j1")
    island.refresh_from_db()
    assert job.state == Job.State.SUCCEEDED
    assert job.started_at is not None
    assert (island.jobs_completed, island.jobs_failed, island.earnings) == (1, 0, Decimal("2.5"))
    assert bridge.counters["status_applied"] == 3
    assert bridge.counters["status_repeat"] == 1
    assert bridge.counters["status_conflict"] == 1


def test_a_host_cannot_settle_another_hosts_job(agent, island, bridge, bob):
    bobs = make_island(bob, host_id="bobs-host-0001")
    give_job(
        island=bobs, job_id="bobs-job", workload="llm-chat", credits=Decimal("9"), lease=timedelta(minutes=5)
    )
    agent.send("status", {"job_id": "bobs-job", "state": "failed", "error": "forged"})
    agent.send("lease", {"job_id": "bobs-job", "extend_seconds": 60})
    wait_for(lambda: bridge.counters["status_unknown_job"] == 1, what="the refused status")
    wait_for(lambda: bridge.counters["lease_unknown_job"] == 1, what="the refused renewal")
    assert Job.objects.get(job_id="bobs-job").state == Job.State.ASSIGNED


def test_lease_renewals_extend_the_hosts_running_job(agent, island, bridge):
    job = give_job(
        island=island, job_id="j1", workload="llm-chat", credits=Decimal("1"), lease=timedelta(seconds=20)
    )
    agent.send("lease", {"job_id": "j1", "extend_seconds": 60})
    wait_for(lambda: bridge.counters["lease_extended"] == 1, what="the renewal")
    renewed = Job.objects.get(pk=job.pk).lease_expires_at
    assert renewed - job.lease_expires_at > timedelta(seconds=35)


def test_pings_are_answered(agent):
    assert agent.request(agent.subjects.of_host(HOST_ID, "ping"), b"ping", timeout=5) == b"pong"


# --- Malformed input -------------------------------------------------------------------


def test_malformed_messages_are_counted_and_the_bridge_carries_on(agent, island, bridge):
    junk: list[Any] = [b"", b"\xff\xfe", b"not json", b"[]", b"null", {"state": 7}, b"{" * 100_000]
    for kind in ("heartbeat", "status", "lease"):
        for body in junk:
            agent.send(kind, body)
    for body in junk:
        agent.publish(agent.subjects.register, body)
    agent.publish(agent.subjects.of_host("x", "heartbeat"), AGENT_HEARTBEAT)  # no valid host_id
    agent.publish(f"{agent.subjects.prefix}host.{HOST_ID}.heartbeat.extra", AGENT_HEARTBEAT)  # not subscribed
    answer = json.loads(agent.request(agent.subjects.pairing, b"\x00 binary"))
    assert answer == {"success": False, "error": "body is not valid JSON"}

    # Still serving: a ping is answered and a good heartbeat is written.
    assert agent.request(agent.subjects.of_host(HOST_ID, "ping"), b"ping") == b"pong"
    agent.send("heartbeat", AGENT_HEARTBEAT)
    wait_for(lambda: Island.objects.get(pk=island.pk).last_heartbeat_at, what="the good heartbeat")

    rejected = {name: count for name, count in bridge.counters.items() if name.startswith("rejected_")}
    # {"state": 7} is a valid heartbeat: unknown fields are ignored, as over HTTP.
    assert rejected["rejected_heartbeat_malformed"] == 5
    assert rejected["rejected_heartbeat_too_large"] == 1
    assert rejected["rejected_heartbeat_subject"] == 1
    assert rejected["rejected_status_malformed"] + rejected["rejected_status_too_large"] == len(junk)
    assert rejected["rejected_lease_malformed"] + rejected["rejected_lease_too_large"] == len(junk)
    assert rejected["rejected_register_malformed"] + rejected["rejected_register_too_large"] == len(junk)
    assert rejected["rejected_pairing_malformed"] == 1
    assert not PairingCode.objects.exists()


# --- The command as a process: draining on stop, riding out NATS outages -------------------


class BridgeProcess:
    def __init__(self, url: str, prefix: str, log: Path, *args: str):
        self.log = log
        env = {
            **os.environ,
            "DATABASE_URL": _test_database_url(),
            "NATS_URL": url,
            "DJANGO_SETTINGS_MODULE": "archipelag.settings",
            "PYTHONUNBUFFERED": "1",
        }
        with log.open("wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "nats_bridge", "--subject-prefix", prefix, *args],
                cwd=BASE_DIR,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30, count: int = 1) -> None:
        def seen() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"the bridge exited with {self.process.returncode}:\n{self.output()}")
            return self.output().count(text) >= count

        wait_for(seen, timeout, what=f"{text!r} in the bridge's log:\n{self.output()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the bridge did not stop within {timeout} s:\n{self.output()}")


@pytest.fixture
def bridge_process(transactional_db: None, tmp_path: Path) -> Iterator[Callable[..., BridgeProcess]]:
    started: list[tuple[BridgeProcess, str, str]] = []

    def start(url: str, prefix: str, *args: str) -> BridgeProcess:
        process = BridgeProcess(url, prefix, tmp_path / f"bridge-{len(started)}.log", *args)
        started.append((process, url, prefix))
        return process

    yield start
    for process, _, _ in started:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()
    for url, prefix in {(url, prefix) for _, url, prefix in started}:
        delete_stream(url, default_stream(prefix))


class NatsServer:
    """A nats-server of the test's own, on a spare port, so it may be stopped.

    With `store`, JetStream is on and keeps its streams there, so they
    survive a stop and a start as a production server's do.
    """

    def __init__(self, port: int, log: Path, store: Path | None = None):
        self.port = port
        self.url = f"nats://127.0.0.1:{port}"
        self.log = log
        self.store = store
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        jetstream = ["-js", "-sd", str(self.store)] if self.store else []
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), *jetstream],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: "Server is ready" in self.log.read_text(errors="replace"), what="nats-server")

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(10)
        self.log.write_text("")  # so the next start waits for its own "ready"


@pytest.fixture
def own_nats(nats_url: str, tmp_path: Path) -> Iterator[NatsServer]:
    """Needs NATS like the others (the embedded run skips it) and the nats-server binary."""
    if not Path(NATS_SERVER).exists():
        pytest.skip(f"needs the nats-server binary at {NATS_SERVER} to stop and restart a server")
    server = NatsServer(_free_port(), tmp_path / "nats-server.log")
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.kill()
        server.process.wait()


def test_sigterm_drains_and_writes_every_heartbeat_received(nats_url, bridge_process, alice):
    hosts = [f"drain-host-{n:04d}" for n in range(300)]
    Island.objects.bulk_create([Island(owner=alice, host_id=host, name=host) for host in hosts])
    prefix = fresh_prefix()
    # Nothing would be written for ten minutes: only the drain on stop writes them.
    bridge = bridge_process(nats_url, prefix, "--flush-ms", "600000", "--batch-size", "100000")
    bridge.wait_for_log("event=bridge_ready")

    agent = Agent(nats_url, Subjects(prefix))
    try:

        async def publish_all() -> None:
            for host in hosts:
                await agent.nc.publish(
                    agent.subjects.of_host(host, "heartbeat"),
                    json.dumps(AGENT_HEARTBEAT | {"host_id": host}).encode(),
                )
            await agent.synced()

        agent._run(publish_all())
    finally:
        agent.close()
    assert Island.objects.filter(last_heartbeat_at__isnull=False).count() == 0

    assert bridge.stop(signal.SIGTERM) == 0
    assert Island.objects.filter(host_id__in=hosts, last_heartbeat_at__isnull=False).count() == len(hosts)
    output = bridge.output()
    assert "heartbeats_applied=300" in output
    assert "Stopped." in output


def test_the_bridge_starts_before_nats_and_survives_its_restart(own_nats, bridge_process, island):
    prefix = fresh_prefix()
    bridge = bridge_process(own_nats.url, prefix, "--flush-ms", "50")
    bridge.wait_for_log("event=nats_unreachable")

    own_nats.start()
    bridge.wait_for_log("event=bridge_ready")
    agent = Agent(own_nats.url, Subjects(prefix))
    try:
        agent.send("heartbeat", AGENT_HEARTBEAT | {"agent_version": "0.5.0"})
        wait_for(
            lambda: Island.objects.get(pk=island.pk).agent_version == "0.5.0", what="the first heartbeat"
        )

        own_nats.stop()
        bridge.wait_for_log("event=nats_disconnected")
        # Down long enough for several failed reconnects (backoff from 0.25 s):
        # a client that gave up after a few would stay disconnected.
        time.sleep(4)
        own_nats.start()
        bridge.wait_for_log("event=nats_reconnected")
        # The agent's client reconnects by itself too; then messages flow again.
        wait_for(lambda: agent.nc.is_connected, what="the agent to reconnect")
        agent.send("heartbeat", AGENT_HEARTBEAT | {"agent_version": "0.5.1"})
        wait_for(
            lambda: Island.objects.get(pk=island.pk).agent_version == "0.5.1",
            what="a heartbeat after the restart",
        )
        assert json.loads(agent.request(agent.subjects.pairing, {"host_id": HOST_ID})) == {
            "success": False,
            "error": "already paired",
        }
    finally:
        agent.close()
    assert bridge.stop(signal.SIGINT) == 0
