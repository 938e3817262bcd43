"""Uptime: a small bonus for each full UTC day online, judged once per day after it ends."""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from karma import rules
from karma.models import KarmaEvent, UptimeSweep
from tests.karma.conftest import (
    assert_ledger_adds_up,
    beat,
    beat_through,
    events,
    karma,
    make_island,
    sign_off,
    watch,
)

DAY = date(2026, 3, 2)
MIDNIGHT = datetime(2026, 3, 2, tzinfo=UTC)  # the day starts
END = MIDNIGHT + timedelta(days=1)  # and ends
HOUR = timedelta(hours=1)
SECOND = timedelta(seconds=1)


@pytest.fixture(autouse=True)
def _hourly_heartbeats_suffice(settings):
    # Islands beat every 10 s and count as online for 45 s after each beat;
    # here one beat an hour and two hours of grace make the same history
    # with far fewer writes.
    settings.ISLAND_OFFLINE_AFTER = 2 * 3600


def uptime_events(island):
    return [event for event in events(island) if event.cause == KarmaEvent.Cause.UPTIME]


def test_online_from_a_second_before_midnight_earns_the_day(island):
    beat_through(island, MIDNIGHT - SECOND, END + HOUR, HOUR)
    watch(END + timedelta(seconds=59))  # judged a minute after the day ends
    assert uptime_events(island) == []
    watch(END + timedelta(seconds=61))
    [event] = uptime_events(island)
    assert (event.day, event.delta, event.effective_at) == (DAY, Decimal(1), END)
    assert event.reason == "Online all day on 2026-03-02 (UTC)"
    assert karma(island) == Decimal(51)


def test_online_from_a_second_after_midnight_does_not(island):
    beat_through(island, MIDNIGHT + SECOND, END + HOUR, HOUR)
    watch(END + timedelta(minutes=2))
    assert uptime_events(island) == []


def test_the_heartbeats_must_carry_it_past_the_end_of_the_day(alice):
    just_short = make_island(alice, "short-host-0001")
    just_past = make_island(alice, "past-host-00001")
    # Each one's last heartbeat leaves it online until 24:00, or a second past it.
    beat_through(just_short, MIDNIGHT - HOUR, END - 2 * HOUR, HOUR)
    beat_through(just_past, MIDNIGHT - HOUR, END - 2 * HOUR, HOUR)
    beat(just_past, END - 2 * HOUR + SECOND)
    watch(END + timedelta(minutes=2))
    assert uptime_events(just_short) == []
    assert [event.day for event in uptime_events(just_past)] == [DAY]


def test_a_judgement_before_the_silence_is_recorded_is_still_right(island):
    # The watcher never recorded the silence (its deadline at 23:00 passed
    # unnoticed); the Island's own deadline shows it was not online at 24:00.
    beat_through(island, MIDNIGHT - HOUR, END - 3 * HOUR, HOUR)
    assert not island.status_changes.filter(reason="silence").exists()
    assert KarmaEvent.objects.reward_uptime(END + timedelta(minutes=2)) == []
    assert UptimeSweep.objects.filter(day=DAY, rewarded=0).exists()


def test_a_short_silence_forfeits_the_day_without_a_penalty(island):
    beat_through(island, MIDNIGHT - HOUR, MIDNIGHT + 10 * HOUR, HOUR)
    # Two hours and a minute without a heartbeat: one minute offline.
    beat_through(island, MIDNIGHT + 12 * HOUR + timedelta(minutes=1), END + HOUR, HOUR)
    watch(END + timedelta(minutes=2))
    assert events(island) == []


def test_a_sign_off_forfeits_the_day_and_costs_nothing(island):
    beat_through(island, MIDNIGHT - HOUR, MIDNIGHT + 12 * HOUR, HOUR)
    sign_off(island, MIDNIGHT + 12 * HOUR + timedelta(minutes=1))
    beat_through(island, MIDNIGHT + 12 * HOUR + timedelta(minutes=5), END + HOUR, HOUR)
    watch(END + timedelta(minutes=2))
    assert events(island) == []


def test_each_day_is_judged_and_rewarded_once(island):
    beat_through(island, MIDNIGHT - HOUR, END + HOUR, HOUR)
    for _ in range(3):
        watch(END + timedelta(minutes=2))
    watch(END + timedelta(minutes=30))
    assert len(uptime_events(island)) == 1
    assert UptimeSweep.objects.get(day=DAY).rewarded == 1
    assert_ledger_adds_up(island)


def test_a_stopped_watcher_catches_up_on_each_day(island):
    watch(MIDNIGHT + timedelta(minutes=2))  # judges the day before DAY
    beat_through(island, MIDNIGHT - HOUR, END + 4 * 24 * HOUR, HOUR)
    # The watcher is down for four days.
    watch(END + 4 * 24 * HOUR - 3 * HOUR)
    assert [event.day for event in uptime_events(island)] == [DAY + timedelta(days=n) for n in range(4)]
    assert [event.effective_at for event in uptime_events(island)] == [
        END + timedelta(days=n) for n in range(4)
    ]
    assert karma(island) == Decimal(54)


def test_removed_islands_earn_nothing(island):
    beat_through(island, MIDNIGHT - HOUR, END + HOUR, HOUR)
    island.remove(END + HOUR)
    watch(END + 2 * HOUR)
    assert events(island) == []


def test_the_bonus_is_read_from_the_rules(island, monkeypatch):
    monkeypatch.setattr(rules, "UPTIME_DAY_BONUS", Decimal("2.5"))
    beat_through(island, MIDNIGHT - HOUR, END + HOUR, HOUR)
    watch(END + timedelta(minutes=2))
    assert karma(island) == Decimal("52.5")


@pytest.mark.parametrize(
    ("last_judged", "now", "days"),
    [
        (None, END + timedelta(seconds=59), [DAY - timedelta(days=1)]),
        (None, END + timedelta(seconds=60), [DAY]),
        (DAY, END + timedelta(hours=23), []),
        (DAY - timedelta(days=1), END + timedelta(minutes=1), [DAY]),
        (
            DAY - timedelta(days=30),
            END + timedelta(minutes=1),
            [DAY - timedelta(days=n) for n in range(6, -1, -1)],
        ),
    ],
)
def test_which_days_are_judged(last_judged, now, days):
    assert rules.days_to_judge(last_judged, now) == days
