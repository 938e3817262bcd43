"""The NATS bridge's rules, without a NATS server: what each message does.

The bridge's handlers call these functions in a thread pool; here they are
called directly. tests/bridge/test_nats.py runs the same paths
through a real nats-server.
"""

import asyncio
import json
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
import time_machine
from django.db import OperationalError

from archipelag import nats as bridge
from archipelag.nats import Bridge, Subjects
from islands.agent import Capabilities, EnhancedHeartbeat, HostRegistration, JobStatus, LeaseRenewal
from islands.models import HEARTBEAT_FIELDS, JOB_LEASE_MAX, Beat, HeartbeatOutcome, Island, Job, JobNotFound
from pairing.models import PairingCode
from tests.conftest import CAPABILITIES, HOST_ID
from tests.islands.conftest import AGENT_HEARTBEAT, T0, make_island
from tests.islands.conftest import give_job as record_job

OTHER_HOST = "7d444840-9dc0-11d1-b245-5ffdce74fad2"
REGISTERED = msgspec.convert(CAPABILITIES, Capabilities)


@dataclass
class FakeMessage:
    """A NATS message as the bridge's handlers read it."""

    subject: str
    data: bytes
    reply: str = ""
    replies: list[bytes] = field(default_factory=list)

    async def respond(self, data: bytes) -> None:
        self.replies.append(data)


def give_job(island: Island, job_id: str = "j1", lease: timedelta = timedelta(minutes=5)) -> Job:
    return record_job(
        island=island, job_id=job_id, workload="llm-chat", credits=Decimal("2.5"), lease=lease, now=T0
    )


# --- Subjects -----------------------------------------------------------------------


def test_subjects_name_the_host_only_when_valid():
    subjects = Subjects()
    assert subjects.host_id(f"host.{HOST_ID}.heartbeat", "heartbeat") == HOST_ID
    assert subjects.host_id(f"host.{HOST_ID}.status", "heartbeat") is None
    assert subjects.host_id("host.short.heartbeat", "heartbeat") is None
    assert subjects.host_id("host.bad$host-id.heartbeat", "heartbeat") is None
    assert subjects.host_id(f"hosts.{HOST_ID}.heartbeat", "heartbeat") is None


def test_a_prefix_moves_every_subject():
    subjects = Subjects("t1.")
    assert subjects.pairing == "t1.coordinator.hosts.pairing"
    assert subjects.of_hosts("heartbeat") == "t1.host.*.heartbeat"
    assert subjects.host_id(f"t1.host.{HOST_ID}.lease", "lease") == HOST_ID
    assert subjects.host_id(f"host.{HOST_ID}.lease", "lease") is None


# --- Pairing and registration -----------------------------------------------------


def test_a_pairing_request_gets_a_code_redeemable_at_pair(alice, alice_client):
    outcome, answer = bridge.request_code(HostRegistration(host_id=HOST_ID))
    assert outcome == "issued"
    assert answer["success"] is True
    assert answer["expires_in_seconds"] == 600
    assert answer["pair_url"] == "http://127.0.0.1:8000/pair"
    row = PairingCode.objects.get(host_id=HOST_ID)
    assert row.channel == PairingCode.Channel.NATS
    assert row.device_secret_hash == ""  # the agent never polls
    assert alice_client.post("/pair/confirm", {"code": answer["code"]}).status_code == 302
    assert Island.objects.get(host_id=HOST_ID).owner == alice


def test_a_linked_host_hears_exactly_already_paired(alice):
    make_island(alice)
    assert bridge.request_code(HostRegistration(host_id=HOST_ID)) == (
        "already_paired",
        {"success": False, "error": "already paired"},
    )
    assert not PairingCode.objects.exists()


def test_the_code_shows_the_hardware_the_host_registered_with(alice_client, db):
    assert bridge.register(HostRegistration(HOST_ID, REGISTERED, "0.5.0")) is False
    _, answer = bridge.request_code(HostRegistration(host_id=HOST_ID))
    html = alice_client.post("/pair", {"code": answer["code"]}).content.decode()
    assert "RTX 4090, 24 GB VRAM" in html
    assert "0.5.0" in html
    assert "us-east" in html


def test_a_registration_handled_after_the_pairing_request_still_reaches_the_code(db):
    _, answer = bridge.request_code(HostRegistration(host_id=HOST_ID))
    bridge.register(HostRegistration(HOST_ID, REGISTERED, "0.5.0"))
    row = PairingCode.objects.find(answer["code"])
    assert row.capabilities == CAPABILITIES
    assert row.agent_version == "0.5.0"


def test_a_registration_handled_while_the_code_is_drawn_still_reaches_it(db, monkeypatch):
    """Two bridge threads: the pairing request reads no registration, the registration
    lands before the code is in the database (so it updates no code), then the code is
    inserted. The request looks again once its code is committed."""
    draw = PairingCode.objects._issue

    def registration_lands_first(**kwargs):
        assert bridge.register(HostRegistration(HOST_ID, REGISTERED, "0.5.0")) is False
        assert not PairingCode.objects.exists()  # nothing for the registration to update yet
        return draw(**kwargs)

    monkeypatch.setattr(PairingCode.objects, "_issue", registration_lands_first)
    outcome, answer = bridge.request_code(HostRegistration(host_id=HOST_ID))
    assert outcome == "issued"
    row = PairingCode.objects.find(answer["code"])
    assert row.capabilities == CAPABILITIES
    assert row.agent_version == "0.5.0"


def test_registration_updates_a_linked_island_and_keeps_what_it_leaves_out(alice):
    island = make_island(alice, gpu_model="RTX 3060", cpu_cores=8, region="eu-west")
    linked = bridge.register(
        HostRegistration(HOST_ID, Capabilities(gpu_model="RTX 4090", cpu_cores=16), "0.5.1")
    )
    assert linked is True
    island.refresh_from_db()
    assert (island.gpu_model, island.cpu_cores, island.region, island.agent_version) == (
        "RTX 4090",
        16,
        "eu-west",
        "0.5.1",
    )


def test_pairing_over_nats_is_limited_per_host(db):
    for _ in range(10):
        assert bridge.request_code(HostRegistration(host_id=HOST_ID))[0] == "issued"
    outcome, answer = bridge.request_code(HostRegistration(host_id=HOST_ID))
    assert outcome == "rate_limited"
    assert answer["error"].startswith("too many pairing requests from this Island; retry in")
    # Another host is not held up by this one.
    assert bridge.request_code(HostRegistration(host_id=OTHER_HOST))[0] == "issued"


def test_pairing_over_nats_has_no_service_wide_budget(db):
    """Issue 13: 320 made-up hosts used to shut NATS pairing for every honest agent."""
    hosts = [f"made-up-host-{n:04d}" for n in range(400)]
    outcomes = [bridge.request_code(HostRegistration(host_id=host))[0] for host in hosts]
    assert outcomes == ["issued"] * 400
    assert bridge.request_code(HostRegistration(host_id=HOST_ID))[0] == "issued"
    assert PairingCode.objects.filter(host_id=HOST_ID).count() == 1


# --- Job states and leases ---------------------------------------------------------


def test_a_status_counts_once_however_often_it_is_redelivered(alice):
    island = make_island(alice)
    give_job(island)
    succeeded = JobStatus(job_id="j1", state="succeeded")
    assert bridge.apply_job_status(HOST_ID, succeeded) == "applied"
    assert bridge.apply_job_status(HOST_ID, succeeded) == "repeat"
    assert bridge.apply_job_status(HOST_ID, JobStatus(job_id="j1", state="failed")) == "conflict"
    island.refresh_from_db()
    assert (island.jobs_completed, island.jobs_failed, island.earnings) == (1, 0, Decimal("2.5"))


def handle_status(bridge_: Bridge, payload: dict[str, Any]) -> None:
    """Run the status handler as the bridge does, its database calls in its thread pool."""

    async def handle() -> None:
        bridge_._loop = asyncio.get_running_loop()
        await bridge_.on_status(FakeMessage(f"host.{HOST_ID}.status", json.dumps(payload).encode()))

    try:
        asyncio.run(handle())
    finally:
        bridge_._executor.shutdown()


def dropping_the_connection(times: int):
    """apply_job_status whose first `times` calls meet a dropped database connection."""
    calls = []

    def apply(host_id, status):
        calls.append(status.job_id)
        if len(calls) <= times:
            raise OperationalError("consuming input failed: server closed the connection unexpectedly")
        return real_apply_job_status(host_id, status)

    return apply


real_apply_job_status = bridge.apply_job_status


def test_a_status_that_meets_a_dropped_connection_is_applied_on_a_new_one(
    alice, monkeypatch, transactional_db
):
    island = make_island(alice)
    give_job(island)
    monkeypatch.setattr(bridge, "STATUS_RETRY_FIRST", 0)
    monkeypatch.setattr(bridge, "apply_job_status", dropping_the_connection(times=2))
    bridge_ = Bridge(["nats://127.0.0.1:1"])
    handle_status(bridge_, {"job_id": "j1", "state": "succeeded"})
    assert (bridge_.counters["status_retries"], bridge_.counters["status_applied"]) == (2, 1)
    assert Job.objects.get(job_id="j1").state == Job.State.SUCCEEDED
    island.refresh_from_db()
    assert island.jobs_completed == 1


def test_a_status_is_given_up_after_four_tries(alice, monkeypatch, transactional_db):
    island = make_island(alice)
    give_job(island)
    monkeypatch.setattr(bridge, "STATUS_RETRY_FIRST", 0)
    monkeypatch.setattr(bridge, "apply_job_status", dropping_the_connection(times=4))
    bridge_ = Bridge(["nats://127.0.0.1:1"])
    handle_status(bridge_, {"job_id": "j1", "state": "succeeded"})
    assert (bridge_.counters["status_retries"], bridge_.counters["status_failed"]) == (3, 1)
    assert Job.objects.get(job_id="j1").state == Job.State.ASSIGNED


def test_a_host_cannot_report_on_another_hosts_job(alice, bob):
    make_island(alice)
    bobs = make_island(bob, host_id=OTHER_HOST)
    give_job(bobs)
    assert bridge.apply_job_status(HOST_ID, JobStatus(job_id="j1", state="failed")) == "unknown_job"
    assert (
        bridge.apply_job_status("unpaired-host-1", JobStatus(job_id="j1", state="failed")) == "unknown_host"
    )
    assert Job.objects.get(job_id="j1").state == Job.State.ASSIGNED


@pytest.mark.parametrize(
    ("asked", "after"),
    [(60, timedelta(seconds=60)), (86_400, timedelta(minutes=5)), (-5, timedelta(minutes=5))],
    ids=["as-asked", "capped", "never-shortened"],
)
def test_a_lease_renewal_reaches_at_most_five_minutes_ahead(alice, asked, after):
    island = make_island(alice)
    give_job(island, lease=timedelta(minutes=5))
    now = T0 + timedelta(minutes=1)
    Job.objects.extend_lease(island, "j1", asked, now)
    expected = max(now + after, T0 + timedelta(minutes=5)) if asked >= 0 else T0 + timedelta(minutes=5)
    assert Job.objects.get(job_id="j1").lease_expires_at == expected


def test_a_renewal_never_carries_a_job_past_the_longest_lease(alice):
    island = make_island(alice)
    give_job(island, lease=JOB_LEASE_MAX)
    now = T0 + JOB_LEASE_MAX - timedelta(seconds=10)
    assert Job.objects.extend_lease(island, "j1", 60, now) == T0 + JOB_LEASE_MAX


def test_a_passed_lease_is_not_revived_and_a_finished_job_not_renewed(alice):
    island = make_island(alice)
    give_job(island, "late", lease=timedelta(seconds=30))
    give_job(island, "done")
    Job.objects.apply_status(island, "done", "succeeded", now=T0)
    assert Job.objects.extend_lease(island, "late", 60, T0 + timedelta(seconds=31)) is None
    assert Job.objects.extend_lease(island, "done", 60, T0 + timedelta(seconds=1)) is None
    assert Job.objects.get(job_id="late").lease_expires_at == T0 + timedelta(seconds=30)


def test_a_renewed_lease_holds_off_the_watcher(alice):
    island = make_island(alice)
    give_job(island, lease=timedelta(seconds=60))
    with time_machine.travel(T0 + timedelta(seconds=40), tick=False):
        assert bridge.renew_lease(HOST_ID, LeaseRenewal(job_id="j1", extend_seconds=60)) == "extended"
    assert Job.objects.time_out_expired(T0 + timedelta(seconds=61)) == []
    assert Job.objects.time_out_expired(T0 + timedelta(seconds=101)) == ["j1"]


def test_renewals_for_other_hosts_jobs_are_refused(alice, bob):
    make_island(alice)
    give_job(make_island(bob, host_id=OTHER_HOST))
    renewal = LeaseRenewal(job_id="j1", extend_seconds=60)
    assert bridge.renew_lease(HOST_ID, renewal) == "unknown_job"
    assert bridge.renew_lease("unpaired-host-1", renewal) == "unknown_host"
    with pytest.raises(JobNotFound):
        Job.objects.extend_lease(make_island(alice, host_id="alice-host-2"), "j1", 60)


# --- Heartbeats -----------------------------------------------------------------------


def named_by_host(hosts: list[str], heartbeat: EnhancedHeartbeat) -> list[Beat]:
    return [Beat(heartbeat, T0, host_id=host) for host in hosts]


def accepted(outcomes: list[HeartbeatOutcome]) -> int:
    return outcomes.count(HeartbeatOutcome.ACCEPTED)


def test_a_heartbeat_batch_writes_known_hosts_and_skips_the_rest(alice):
    island = make_island(alice)
    beat = msgspec.convert(AGENT_HEARTBEAT, EnhancedHeartbeat)
    outcomes = bridge.record_heartbeats(named_by_host([HOST_ID, "unpaired-host-1"], beat))
    assert outcomes == [HeartbeatOutcome.ACCEPTED, HeartbeatOutcome.UNAUTHORIZED]
    island.refresh_from_db()
    assert island.status_at(T0 + timedelta(seconds=1)) == Island.LiveStatus.ONLINE
    assert island.agent_version == "0.4.0"
    assert island.asking_prices == {"llm-chat": "2.0", "_default": "1.0"}


def receive(bridge_: Bridge, subject: str, payload: object) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    asyncio.run(bridge_.on_heartbeat(FakeMessage(subject, data)))


def test_the_bridge_keeps_the_latest_heartbeat_per_host_until_it_writes():
    bridge_ = Bridge(["nats://127.0.0.1:1"])
    receive(bridge_, f"host.{HOST_ID}.heartbeat", {**AGENT_HEARTBEAT, "timestamp": 1})
    receive(bridge_, f"host.{HOST_ID}.heartbeat", {**AGENT_HEARTBEAT, "timestamp": 2})
    receive(bridge_, f"host.{OTHER_HOST}.heartbeat", {"status": "online"})  # host_id may be left out
    assert bridge_.counters["heartbeats_superseded"] == 1
    assert {host: beat.heartbeat.timestamp for host, beat in bridge_._pending.items()} == {
        HOST_ID: 2,
        OTHER_HOST: None,
    }


@pytest.mark.parametrize(
    ("subject", "payload", "kind"),
    [
        (f"host.{HOST_ID}.heartbeat", b"not json", "heartbeat_malformed"),
        (f"host.{HOST_ID}.heartbeat", b"", "heartbeat_malformed"),
        (f"host.{HOST_ID}.heartbeat", {"active_jobs": "many"}, "heartbeat_malformed"),
        (f"host.{HOST_ID}.heartbeat", {"asking_prices": {"x": 2.0}}, "heartbeat_malformed"),
        (f"host.{HOST_ID}.heartbeat", [1, 2, 3], "heartbeat_malformed"),
        (
            f"host.{HOST_ID}.heartbeat",
            b'{"cache": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            "heartbeat_malformed",
        ),
        (f"host.{HOST_ID}.heartbeat", b"{" + b" " * 70_000 + b"}", "heartbeat_too_large"),
        ("host.x.heartbeat", {"status": "online"}, "heartbeat_subject"),
    ],
    ids=[
        "not-json",
        "empty",
        "wrong-type",
        "float-price",
        "not-object",
        "deeply-nested",
        "huge",
        "bad-subject",
    ],
)
def test_a_bad_heartbeat_is_counted_and_skipped(subject, payload, kind):
    bridge_ = Bridge(["nats://127.0.0.1:1"])
    receive(bridge_, subject, payload)
    assert bridge_.counters[f"rejected_{kind}"] == 1
    assert not bridge_._pending


@pytest.mark.django_db(transaction=True)
def test_a_heartbeat_naming_another_host_is_counted_and_written_for_neither(alice, bob, monkeypatch):
    """The host check is the model's (Island.objects.record_heartbeats): the bridge counts its verdict."""
    # The write runs from the event loop in this thread, on a connection of its own: safe here.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    mine, other = make_island(alice), make_island(bob, host_id=OTHER_HOST)
    bridge_ = Bridge(["nats://127.0.0.1:1"])
    receive(bridge_, f"host.{HOST_ID}.heartbeat", {**AGENT_HEARTBEAT, "host_id": OTHER_HOST})

    async def in_this_thread(fn, *args):
        # No thread pool: the test waits for the write and reads its counters.
        return fn(*args)

    async def flush() -> bool:
        bridge_._has_beats, bridge_._batch_full = asyncio.Event(), asyncio.Event()
        return await bridge_.write(bridge_.take_batch())

    bridge_._db = in_this_thread  # type: ignore[method-assign]

    assert asyncio.run(flush()) is True
    assert bridge_.counters["rejected_heartbeat_host_mismatch"] == 1
    assert bridge_.counters["heartbeats_applied"] == 0
    assert not bridge_._pending
    assert Island.objects.filter(pk__in=[mine.pk, other.pk], last_heartbeat_at__isnull=False).count() == 0


def test_malformed_requests_get_an_error_naming_the_field_and_write_nothing(db):
    bridge_ = Bridge(["nats://127.0.0.1:1"])
    replies = []
    for body in (b"nope", b'{"host_id": 5}', b'{"host_id": "short"}', b"", b"[" * 20_000):
        msg = FakeMessage("coordinator.hosts.pairing", body, reply="_INBOX.x")
        asyncio.run(bridge_.on_pairing(msg))
        replies.append(json.loads(msg.replies[0]))
    assert all(reply["success"] is False for reply in replies)
    assert [reply["error"] for reply in replies[:4]] == [
        "body is not valid JSON",
        "invalid host_id: Expected `str`, got `int`",
        r"invalid host_id: Expected `str` matching regex '^[A-Za-z0-9._-]{8,64}\\Z'",
        "body is empty: send a JSON object",
    ]
    assert replies[4]["error"].startswith("body too large")
    assert not PairingCode.objects.exists()


def test_a_batch_writes_every_heartbeat_column_as_a_single_save_does(alice):
    """Batches take the fast write path on PostgreSQL; one beat takes save(). Same result."""
    hosts = ["batch-host-0001", "batch-host-0002", "alone-host-0001"]
    for host in hosts:
        make_island(alice, host, gpu_model="", gpu_vram_mb=None, region="eu-west")
    beat = msgspec.convert(
        {
            **AGENT_HEARTBEAT,
            "host_id": None,  # one body for three hosts
            "capabilities": {
                "gpu_model": "RTX 4090",
                "cpu_cores": 32,
                "device_model": "Tower",
                "runtime": "cuda",
            },
            "asking_prices": {"llm-chat": "2.5", "_default": "0.00000001"},
        },
        EnhancedHeartbeat,
    )
    assert accepted(bridge.record_heartbeats(named_by_host(hosts[:2], beat))) == 2
    assert accepted(bridge.record_heartbeats(named_by_host(hosts[2:], beat))) == 1

    def columns(host: str) -> dict[str, Any]:
        row: dict[str, Any] = Island.objects.filter(host_id=host).values(*HEARTBEAT_FIELDS).get()
        return row

    batched, alone = columns(hosts[0]), columns(hosts[2])
    assert batched == alone == columns(hosts[1])
    assert batched["status"] == Island.Status.ONLINE
    assert batched["last_heartbeat_at"] == T0
    assert batched["offline_after"] == T0 + timedelta(seconds=45)
    assert batched["metrics"]["gpus"][0]["power_draw_w"] == 280.5
    assert batched["supported_runtimes"] == ["container", "wasm"]
    assert batched["asking_prices"] == {"llm-chat": "2.5", "_default": "0.00000001"}
    assert (batched["gpu_model"], batched["gpu_vram_mb"], batched["cpu_cores"]) == ("RTX 4090", 24576, 32)
    assert (batched["region"], batched["device_model"], batched["runtime"]) == ("eu-west", "Tower", "cuda")
    assert (batched["os_version"], batched["accelerator"]) == ("", "")


def test_a_full_batch_is_written_in_one_go(alice):
    hosts = [f"full-batch-{n:05d}" for n in range(bridge.BATCH_SIZE)]
    Island.objects.bulk_create([Island(owner=alice, host_id=host, name=host) for host in hosts])
    beat = msgspec.convert({**AGENT_HEARTBEAT, "host_id": None}, EnhancedHeartbeat)
    assert accepted(bridge.record_heartbeats(named_by_host(hosts, beat))) == len(hosts)
    assert Island.objects.filter(last_heartbeat_at=T0, agent_version="0.4.0").count() == len(hosts)


def test_a_body_that_is_not_utf8_is_refused_like_any_malformed_one(db):
    """Found by tests/fuzz: msgspec raised UnicodeDecodeError, which no handler caught."""
    bridge_ = Bridge(["nats://127.0.0.1:1"])
    receive(bridge_, f"host.{HOST_ID}.heartbeat", b'{"agent_version": "caf\xe9"}')
    assert bridge_.counters["rejected_heartbeat_malformed"] == 1
    msg = FakeMessage(
        "coordinator.hosts.pairing", b'{"host_id": "\xff\xfe\xfd\xfc\xfb\xfa"}', reply="_INBOX.x"
    )
    asyncio.run(bridge_.on_pairing(msg))
    assert json.loads(msg.replies[0]) == {
        "success": False,
        "error": "body is not valid JSON: it is not UTF-8",
    }
    assert not PairingCode.objects.exists()
