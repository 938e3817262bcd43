"""The ledger: every change is an event, the score is their clamped running sum, each cause counts once."""

import random
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction

from islands.models import Island, StatusChange
from karma.models import KarmaEvent
from tests.karma.conftest import T0, assert_ledger_adds_up, beat, events, give, karma, run_job, watch

Cause = KarmaEvent.Cause


def test_a_new_island_starts_at_50(island):
    assert island.karma == Decimal(50)


def test_karma_stops_at_100_and_the_event_says_what_was_asked_and_applied(island):
    Island.objects.filter(pk=island.pk).update(karma=Decimal("99.5"))
    run_job(island, "job-1", T0, "succeeded", timedelta(seconds=1))
    run_job(island, "job-2", T0, "succeeded", timedelta(seconds=1))
    first, second = events(island)
    assert (first.requested_delta, first.delta, first.score_after, first.capped) == (
        Decimal(1),
        Decimal("0.5"),
        Decimal(100),
        True,
    )
    assert (second.requested_delta, second.delta, second.score_after) == (
        Decimal(1),
        Decimal(0),
        Decimal(100),
    )
    assert karma(island) == Decimal(100)


def test_karma_stops_at_0(island):
    Island.objects.filter(pk=island.pk).update(karma=Decimal(1))
    give(island, "job-1", T0, lease=timedelta(minutes=1))
    watch(T0 + timedelta(minutes=2))
    [event] = events(island)
    assert (event.requested_delta, event.delta, event.score_after) == (Decimal(-4), Decimal(-1), Decimal(0))
    run_job(island, "job-2", T0, "failed", timedelta(seconds=1))
    assert karma(island) == Decimal(0)
    assert events(island)[-1].delta == Decimal(0)


def test_an_administrator_adjusts_with_a_reason(island, alice):
    event = KarmaEvent.objects.adjust(island, Decimal(-70), "Cheating on benchmarks", by=alice, now=T0)
    assert (event.cause, event.delta, event.requested_delta, event.score_after, event.actor) == (
        Cause.ADMIN,
        Decimal(-50),
        Decimal(-70),
        Decimal(0),
        alice,
    )
    assert event.effective_at == T0
    # Two adjustments are two adjustments: admin events have no uniqueness.
    KarmaEvent.objects.adjust(island, Decimal(10), "Our outage, not theirs", by=alice)
    KarmaEvent.objects.adjust(island, Decimal(10), "Our outage, not theirs", by=alice)
    assert karma(island) == Decimal(20)


@pytest.mark.parametrize(("delta", "reason"), [(Decimal(5), "  "), (Decimal(101), "too much")])
def test_an_adjustment_needs_a_reason_and_a_sane_size(island, delta, reason):
    with pytest.raises(ValueError, match="adjustment"):
        KarmaEvent.objects.adjust(island, delta, reason, by=None)
    assert events(island) == []


def test_the_score_is_the_running_sum_of_its_events_in_any_mix(island):
    rng = random.Random(5)
    for n in range(120):
        at = T0 + timedelta(minutes=n)
        match rng.choice(["succeeded", "failed", "timed_out", "cancelled", "admin"]):
            case "admin":
                KarmaEvent.objects.adjust(island, Decimal(rng.randint(-30, 30) or 1), "test", by=None, now=at)
            case "timed_out":
                give(island, f"job-{n}", at, lease=timedelta(seconds=1))
                watch(at + timedelta(seconds=2))
            case state:
                run_job(island, f"job-{n}", at, state, timedelta(seconds=rng.choice([1, 30, 90])))
    assert len(events(island)) > 80
    assert_ledger_adds_up(island)


# --- The database refuses a second event for one cause -------------------------------------


def duplicate(event: KarmaEvent, **changes) -> None:
    event.pk = None
    for name, value in changes.items():
        setattr(event, name, value)
    with pytest.raises(IntegrityError), transaction.atomic():
        event.save()


def test_one_event_per_job_is_a_database_constraint(island):
    run_job(island, "job-1", T0, "succeeded", timedelta(seconds=1))
    duplicate(events(island)[0], reason="again")


def test_one_event_per_disconnection_step_is_a_database_constraint(island):
    beat(island, T0)
    watch(T0 + timedelta(minutes=20))
    [event] = events(island)
    duplicate(event, effective_at=T0 + timedelta(hours=1))


def test_one_uptime_event_per_island_and_day_is_a_database_constraint(island):
    event = KarmaEvent.objects.apply(
        island.pk, Decimal(1), cause=Cause.UPTIME, reason="day", effective_at=T0, day=T0.date()
    )
    assert (
        KarmaEvent.objects.apply(
            island.pk, Decimal(1), cause=Cause.UPTIME, reason="day", effective_at=T0, day=T0.date()
        )
        is None
    )
    assert event is not None
    duplicate(event)


def test_an_event_must_name_the_cause_of_its_kind(island):
    silence = StatusChange.objects.create(
        island=island, at=T0, from_status="online", to_status="offline", reason="silence"
    )
    with pytest.raises(IntegrityError), transaction.atomic():
        KarmaEvent.objects.apply(island.pk, Decimal(-1), cause=Cause.JOB, reason="no job", effective_at=T0)
    with pytest.raises(IntegrityError), transaction.atomic():
        KarmaEvent.objects.apply(
            island.pk,
            Decimal(-1),
            cause=Cause.DISCONNECTION,
            reason="no step",
            effective_at=T0,
            status_change=silence,
        )
    assert karma(island) == Decimal(50)


def test_the_score_column_refuses_values_outside_the_range(island):
    with pytest.raises(IntegrityError), transaction.atomic():
        Island.objects.filter(pk=island.pk).update(karma=Decimal("100.01"))


def test_a_broken_event_is_never_taken_for_a_repeat(island):
    run_job(island, "job-1", T0, "succeeded", timedelta(seconds=1))
    # A job event without its job violates the shape check; that another job
    # event exists must not make it pass as "already recorded".
    with pytest.raises(IntegrityError), transaction.atomic():
        KarmaEvent.objects.apply(island.pk, Decimal(-1), cause=Cause.JOB, reason="no job", effective_at=T0)


def test_saving_an_island_loaded_earlier_keeps_the_karma_recorded_since(island, alice_client):
    stale = Island.objects.get(pk=island.pk)
    run_job(island, "job-1", T0, "succeeded", timedelta(seconds=1))
    stale.name = "Renamed"
    stale.save()
    island.refresh_from_db()
    assert (island.name, island.karma, island.jobs_completed) == ("Renamed", Decimal(51), 1)
    # The same through the rename form, which saves the Island it loaded.
    alice_client.post(f"/settings/islands/{island.pk}/rename", {"name": "Garage rig"})
    assert_ledger_adds_up(island)
