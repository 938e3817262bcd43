"""Pairing over NATS is no lockout lever: no service-wide budget, and bounded memory for made-up hosts.

Issue 13: 320 pairing requests for made-up host ids in 4 s used to shut NATS
pairing for every honest agent, and 50,000 registrations for made-up hosts
left 50,000 keys in Redis. Now each host has its own limit, and what hosts
that are not linked can hold (unused codes, kept registrations) is bounded
by count, the oldest going first.
"""

import json
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import time_machine
from django.test import override_settings
from django.utils import timezone

from archipelag import nats as bridge
from archipelag.nats import Bridge
from islands.agent import Capabilities, HostRegistration
from pairing import pending
from pairing.models import PairingCode
from tests.bridge.test_nats import Agent, delete_stream, fresh_prefix, run_bridge, stop_bridge, wait_for
from tests.conftest import HOST_ID

REGISTRATION = HostRegistration(HOST_ID, Capabilities(gpu_model="RTX 4090", cpu_cores=16), "0.5.0")


def made_up(n: int) -> str:
    return f"made-up-{n:06d}-{uuid.uuid4().hex[:8]}"


@override_settings(NATS_PENDING_CODES_MAX=5)
def test_past_the_cap_the_oldest_unused_nats_codes_go_first(db, time_machine):
    time_machine.move_to(timezone.now(), tick=False)
    for n in range(8):
        PairingCode.objects.request(HostRegistration(made_up(n)), channel=PairingCode.Channel.NATS)
        time_machine.shift(timedelta(seconds=1))
    over_http = PairingCode.objects.request(
        HostRegistration(made_up(99)), channel=PairingCode.Channel.HTTP, ip="192.0.2.1"
    )
    outcome, answer = bridge.request_code(REGISTRATION)
    assert (outcome, answer["success"]) == ("issued", True)

    nats_codes = PairingCode.objects.filter(channel=PairingCode.Channel.NATS)
    assert nats_codes.count() == 5
    kept = sorted(nats_codes.values_list("host_id", flat=True))
    assert HOST_ID in kept  # the newest stays: the honest agent that just asked
    assert not any(
        host.startswith(("made-up-000000", "made-up-000001", "made-up-000002", "made-up-000003"))
        for host in kept
    )
    # Codes asked for over HTTP are not counted against it, nor dropped.
    assert PairingCode.objects.filter(pk=over_http.row.pk).exists()
    # The honest code still works at /pair.
    assert PairingCode.objects.lookup(answer["code"]).host_id == HOST_ID


@override_settings(NATS_PENDING_CODES_MAX=2)
def test_used_codes_are_never_dropped_to_make_room(db, alice):
    answer = bridge.request_code(REGISTRATION)[1]
    island = PairingCode.objects.lookup(answer["code"]).redeem(alice)
    for n in range(4):
        bridge.request_code(HostRegistration(made_up(n)))
    used = PairingCode.objects.get(host_id=HOST_ID)
    assert used.used_at is not None and used.island == island
    assert PairingCode.objects.filter(used_at__isnull=True).count() == 2


@override_settings(NATS_PENDING_REGISTRATIONS_MAX=5)
def test_kept_registrations_are_bounded_and_the_oldest_go_first(redis_url, db):
    for n in range(8):
        bridge.register(HostRegistration(f"made-up-{n}", Capabilities(cpu_cores=n + 1), "0.5.0"))
    bridge.register(REGISTRATION)
    assert pending.count() == 5
    assert [pending.find(f"made-up-{n}") is None for n in range(8)] == [True] * 4 + [False] * 4
    kept = pending.find(HOST_ID)
    assert kept is not None and kept.capabilities == REGISTRATION.capabilities
    # A code asked for now still shows the hardware its host registered with.
    answer = bridge.request_code(HostRegistration(HOST_ID))[1]
    assert PairingCode.objects.lookup(answer["code"]).capabilities["gpu_model"] == "RTX 4090"


def test_kept_registrations_are_forgotten_after_an_hour(redis_url, db):
    with time_machine.travel(timezone.now(), tick=False) as traveller:
        bridge.register(REGISTRATION)
        traveller.shift(pending.REGISTRATION_TTL + timedelta(seconds=1))
        assert pending.find(HOST_ID) is None
        bridge.register(HostRegistration("made-up-later"))
        assert pending.count() == 1


# --- On a real NATS server, through the bridge ---------------------------------------

BURST = 10_000


@pytest.fixture
def flood_bridge(nats_url: str, transactional_db: None) -> Iterator[Bridge]:
    bridge_ = Bridge([nats_url], prefix=fresh_prefix(), flush_interval=0.05, stats_interval=3600)
    thread = run_bridge(bridge_)
    yield bridge_
    stop_bridge(bridge_, thread)
    delete_stream(nats_url, bridge_.stream)


def test_a_burst_for_made_up_hosts_leaves_an_honest_agent_a_code_within_a_minute(
    nats_url, flood_bridge, alice, alice_client
):
    attacker = Agent(nats_url, flood_bridge.subjects, host_id="attacker")
    honest = Agent(nats_url, flood_bridge.subjects)
    started = time.monotonic()

    async def flood() -> None:
        for n in range(BURST):
            body = json.dumps({"host_id": made_up(n)}).encode()
            await attacker.nc.publish(flood_bridge.subjects.pairing, body, reply=f"_INBOX.flood.{n}")
        await attacker.synced()

    attacker._run(flood(), timeout=120)
    # The agent asks once per start and waits about 10 s; its owner restarts it.
    answer: dict[str, object] = {}
    while time.monotonic() - started < 60 and answer.get("success") is not True:
        try:
            answer = honest.ask_for_code()
        except TimeoutError:
            continue
    took = time.monotonic() - started
    assert answer.get("success") is True, (answer, flood_bridge.counters)
    assert took < 60
    page = alice_client.post("/pair", {"code": answer["code"]}).content.decode()
    assert "RTX 4090" in page
    # Every request of the burst was taken: answered while someone could
    # still be waiting, skipped after that; none refused for a budget.
    wait_for(
        lambda: flood_bridge.counters["pairing_requests"] >= BURST + 1, timeout=60, what="the whole burst"
    )
    counters = flood_bridge.counters
    assert counters["pairing_issued"] + counters["pairing_stale"] >= BURST
    assert counters["pairing_rate_limited"] == 0
    attacker.close()
    honest.close()
