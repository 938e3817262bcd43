"""A host paired again to the account that removed it comes back as the same Island: not a reset."""

from datetime import timedelta
from decimal import Decimal

from islands.models import Island, IslandKey, StatusChange
from karma import rules
from karma.models import KarmaEvent
from pairing.models import PairingCode
from tests.conftest import HOST_ID
from tests.islands.conftest import T0
from tests.karma.conftest import beat, events, run_job, watch
from tests.pairing.conftest import PHONE_HOST_ID, pair_phone

Status = Island.Status


def pair_by_code(issue_code, user, at, **capabilities):
    issued = issue_code(capabilities=capabilities or {"gpu_model": "RTX 3060"}, now=at)
    return PairingCode.objects.lookup(issued.code, now=at).redeem(user, now=at)


def test_a_removed_island_paired_again_keeps_its_karma_history_and_name(alice, issue_code):
    first = pair_by_code(issue_code, alice, T0, gpu_model="RTX 3060")
    Island.objects.filter(pk=first.pk).update(name="Basement rig")
    beat(first, T0 + timedelta(minutes=1))
    run_job(first, "bad-1", T0 + timedelta(minutes=2), "failed", timedelta(seconds=3))
    run_job(first, "good-1", T0 + timedelta(minutes=5), "succeeded", timedelta(seconds=3))
    KarmaEvent.objects.adjust(
        first, Decimal(-20), "Benchmark cheating", by=None, now=T0 + timedelta(minutes=9)
    )
    first = Island.objects.get(pk=first.pk)
    assert first.karma == Decimal(29)
    first.remove(T0 + timedelta(minutes=10))

    again = pair_by_code(issue_code, alice, T0 + timedelta(hours=1), gpu_model="RTX 4090")

    assert again.pk == first.pk
    assert Island.objects.count() == 1
    island = Island.objects.get()
    assert island.removed_at is None
    assert island.paired_at == T0 + timedelta(hours=1)
    assert (island.karma, island.jobs_completed, island.jobs_failed) == (Decimal(29), 1, 1)
    assert island.name == "Basement rig"
    assert island.gpu_model == "RTX 4090"  # what the new pairing says
    assert [event.reason for event in events(island)][-1] == "Benchmark cheating"
    assert island.attempts.count() == 2
    # It comes back as it was removed, signed off, and its next heartbeat is a return.
    assert island.status_at(T0 + timedelta(hours=1)) == Island.LiveStatus.SIGNED_OFF
    beat(island, T0 + timedelta(hours=1, minutes=1))
    latest = island.status_changes.latest("at")
    assert (latest.from_status, latest.to_status, latest.reason) == (
        Status.SIGNED_OFF,
        Status.ONLINE,
        StatusChange.Reason.BACK_ONLINE,
    )


def test_another_account_pairing_the_host_starts_a_new_island(alice, bob, issue_code):
    first = pair_by_code(issue_code, alice, T0)
    KarmaEvent.objects.adjust(first, Decimal(30), "Generous", by=None, now=T0)
    first.remove(T0 + timedelta(minutes=1))

    bobs = pair_by_code(issue_code, bob, T0 + timedelta(minutes=2))

    assert bobs.pk != first.pk
    assert (bobs.owner, bobs.karma, bobs.jobs_completed) == (bob, rules.START, 0)
    assert Island.objects.get(pk=first.pk).karma == Decimal(80)


def test_a_suspension_outlives_removing_and_pairing_again(alice, issue_code):
    first = pair_by_code(issue_code, alice, T0)
    Island.objects.filter(pk=first.pk).update(suspended_at=T0)
    first.remove(T0 + timedelta(minutes=1))
    again = pair_by_code(issue_code, alice, T0 + timedelta(minutes=2))
    assert again.pk == first.pk
    assert Island.objects.get().suspended_at == T0


def test_the_time_it_was_removed_costs_no_karma(alice, issue_code):
    island = pair_by_code(issue_code, alice, T0)
    beat(island, T0)
    watch(T0 + timedelta(minutes=1))  # silent at T0 + 45 s
    island.remove(T0 + timedelta(minutes=20))  # one step (15 min) fell due before removal
    pair_by_code(issue_code, alice, T0 + timedelta(hours=3))
    watch(T0 + timedelta(hours=6))
    assert [event.step for event in events(island)] == [1]
    assert Island.objects.get().karma == Decimal(49)


def test_a_removed_phone_paired_again_keeps_its_karma(client, alice, open_session):
    first = pair_phone(client, secret=open_session(alice).secret).json()
    island = Island.objects.get(pk=first["island_id"])
    KarmaEvent.objects.adjust(island, Decimal(-15), "Cancelled its failures", by=None)
    island.remove()

    second = pair_phone(client, secret=open_session(alice).secret).json()

    assert second["island_id"] == first["island_id"]
    returned = Island.objects.active().get()
    assert (returned.host_id, returned.karma) == (PHONE_HOST_ID, Decimal(35))
    assert Island.objects.authenticate(first["token"]) is None
    assert Island.objects.authenticate(second["token"]) == returned


def test_a_keyed_host_registering_after_its_removal_comes_back_with_its_karma(alice):
    [issued] = IslandKey.objects.issue(alice)
    host_id = issued.key.host_id
    island = IslandKey.objects.link_host(host_id, None, "0.6.0")
    assert island is not None
    KarmaEvent.objects.adjust(island, Decimal(-10), "Slow", by=None)
    island.remove()

    again = IslandKey.objects.link_host(host_id, None, "0.6.1")

    assert again is not None and again.pk == island.pk
    assert (again.karma, again.agent_version) == (Decimal(40), "0.6.1")
    assert IslandKey.objects.get().island == again
    assert host_id != HOST_ID
