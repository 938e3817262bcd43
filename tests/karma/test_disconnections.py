"""Extended disconnections: silence past the grace period costs karma while it lasts, capped per incident."""

from datetime import timedelta
from decimal import Decimal

import pytest

from islands.models import StatusChange
from karma import rules
from karma.models import KarmaEvent
from tests.karma.conftest import (
    T0,
    assert_ledger_adds_up,
    beat,
    events,
    karma,
    sign_off,
    watch,
)

# The Island's last heartbeat is at T0, so it goes silent at its deadline.
SILENT_AT = T0 + timedelta(seconds=45)


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def come_back(island, at):
    """The Island returns at `at`; its owner signs it off 30 s later, so no new silence follows."""
    beat(island, at)
    sign_off(island, at + timedelta(seconds=30))


@pytest.fixture
def silent(island):
    """Alice's Island, online from its first heartbeat at T0, and recorded silent at T0 + 45 s."""
    beat(island, T0)
    watch(SILENT_AT + timedelta(seconds=1))
    assert island.status_changes.filter(reason=StatusChange.Reason.SILENCE, at=SILENT_AT).exists()
    return island


def test_no_charge_within_the_grace_period_one_just_after(silent):
    watch(SILENT_AT + minutes(14) + timedelta(seconds=59))  # 14:59
    assert karma(silent) == Decimal(50)
    assert events(silent) == []

    watch(SILENT_AT + minutes(15) + timedelta(seconds=1))  # 15:01
    assert karma(silent) == Decimal(49)
    [event] = events(silent)
    assert event.cause == KarmaEvent.Cause.DISCONNECTION
    assert event.effective_at == SILENT_AT + minutes(15)
    assert event.reason == "Offline without signing off for 15 min"
    assert (event.status_change.reason, event.step) == (StatusChange.Reason.SILENCE, 1)


def test_the_cost_grows_while_it_lasts_and_stops_at_the_cap(silent):
    for minute in range(0, 6 * 60, 5):
        watch(SILENT_AT + minutes(minute) + timedelta(seconds=1))
    charged = events(silent)
    assert len(charged) == rules.DISCONNECTION_MAX_STEPS == 10
    assert [event.effective_at for event in charged] == [SILENT_AT + minutes(15 * n) for n in range(1, 11)]
    assert karma(silent) == Decimal(40)
    assert (
        charged[-1].reason == "Offline without signing off for 2 h 30 min (the most one disconnection costs)"
    )
    # Capped, it is settled: the watcher stops looking at it.
    assert silent.status_changes.get(reason="silence").karma_settled_at is not None


def test_coming_back_ends_the_charges_without_charging_again(silent):
    watch(SILENT_AT + minutes(40))  # steps at 15 and 30 min
    assert karma(silent) == Decimal(48)
    come_back(silent, SILENT_AT + minutes(50))  # before the 60-minute step, after the 45-minute one
    for hours in (1, 2, 24):
        watch(SILENT_AT + timedelta(hours=hours))
    assert [event.effective_at for event in events(silent)] == [SILENT_AT + minutes(m) for m in (15, 30, 45)]
    assert karma(silent) == Decimal(47)
    assert silent.status_changes.get(reason="silence").karma_settled_at is not None


def test_back_exactly_at_the_end_of_the_grace_period_costs_nothing(silent):
    come_back(silent, SILENT_AT + minutes(15))
    watch(SILENT_AT + timedelta(hours=1))
    assert events(silent) == []


@pytest.mark.parametrize(
    "watcher_runs_every",
    [minutes(1), minutes(7), minutes(40), timedelta(hours=3)],
    ids=["every minute", "every 7 min", "every 40 min", "only after the return"],
)
def test_however_often_the_watcher_runs_the_charges_are_the_same(island, watcher_runs_every):
    """Two hours of silence cost the steps due at 15, 30, ... 105 min, each dated then."""
    beat(island, T0)
    back = SILENT_AT + timedelta(hours=2)
    now = T0 + watcher_runs_every
    while now < back:
        watch(now)
        now += watcher_runs_every
    come_back(island, back)
    watch(back + timedelta(hours=3))
    assert [event.effective_at for event in events(island)] == [
        SILENT_AT + minutes(15 * n) for n in range(1, 8)
    ]
    assert karma(island) == Decimal(43)
    assert_ledger_adds_up(island)


def test_a_watcher_that_never_saw_the_silence_still_charges_it(island):
    beat(island, T0)
    # No watcher runs while the Island is away; its return records the silence.
    come_back(island, SILENT_AT + timedelta(hours=2))
    assert island.status_changes.filter(reason="silence", at=SILENT_AT).exists()
    watch(T0 + timedelta(days=2))
    assert len(events(island)) == 7  # steps due at 15, 30, ... 105 min: strictly before the return
    assert karma(island) == Decimal(43)


def test_a_graceful_sign_off_costs_nothing_however_long(island):
    beat(island, T0)
    sign_off(island, T0 + timedelta(seconds=10))
    for hours in (1, 6, 30):
        watch(T0 + timedelta(hours=hours))
    come_back(island, T0 + timedelta(hours=31))
    watch(T0 + timedelta(hours=32))
    assert events(island) == []
    assert karma(island) == Decimal(50)


def test_a_sign_off_sent_on_the_way_back_ends_the_incident(silent):
    sign_off(silent, SILENT_AT + minutes(35))
    watch(SILENT_AT + timedelta(hours=5))
    assert [event.effective_at for event in events(silent)] == [
        SILENT_AT + minutes(15),
        SILENT_AT + minutes(30),
    ]


def test_a_second_silence_is_a_new_incident(silent):
    beat(silent, SILENT_AT + minutes(20))
    watch(SILENT_AT + minutes(21))
    second_silence = SILENT_AT + minutes(20) + timedelta(seconds=45)
    watch(second_silence + minutes(16))
    assert [event.step for event in events(silent)] == [1, 1]
    assert len({event.status_change_id for event in events(silent)}) == 2
    assert karma(silent) == Decimal(48)


def test_repeated_steps_at_the_same_moment_charge_once(silent):
    for _ in range(3):
        watch(SILENT_AT + minutes(31))
    assert len(events(silent)) == 2
    assert_ledger_adds_up(silent)


def test_removing_an_island_ends_its_disconnection(silent):
    silent.remove(SILENT_AT + minutes(20))
    watch(SILENT_AT + timedelta(hours=6))
    assert len(events(silent)) == 1


def test_the_disconnection_rule_is_computed_from_its_constants(silent, monkeypatch):
    monkeypatch.setattr(rules, "DISCONNECTION_GRACE", minutes(30))
    monkeypatch.setattr(rules, "DISCONNECTION_STEP_PENALTY", Decimal("-2.5"))
    watch(SILENT_AT + minutes(29))
    assert events(silent) == []
    watch(SILENT_AT + minutes(31))
    assert karma(silent) == Decimal("47.5")


@pytest.mark.parametrize(
    ("offline_for", "cost"),
    [
        (minutes(15), "0"),
        (minutes(15) + timedelta(seconds=1), "-1"),
        (timedelta(hours=1), "-3"),
        (timedelta(hours=2), "-7"),
        (timedelta(hours=2, minutes=30), "-9"),
        (timedelta(hours=2, minutes=30, seconds=1), "-10"),
        (timedelta(days=3), "-10"),
    ],
)
def test_what_a_whole_disconnection_costs(offline_for, cost):
    assert rules.disconnection_cost(offline_for) == Decimal(cost)
