"""Karma level crossings: told when an event moves the score across a boundary, either way, without spam."""

from datetime import timedelta
from decimal import Decimal

import time_machine

from karma import rules
from karma.models import KarmaEvent
from notify.models import Notification
from notify.sender import send_due
from tests.islands.conftest import T0, make_island
from tests.notify.conftest import body


def adjust(island, delta, reason="test"):
    island.refresh_from_db()
    return KarmaEvent.objects.adjust(island, Decimal(delta), reason, by=None)


def test_falling_below_a_level_is_told_with_the_event_that_did_it(alice, mailbox):
    island = make_island(alice, name="Garage rig")
    with time_machine.travel(T0, tick=False):
        adjust(island, "-11", "Job job-1 timed out")
        assert send_due() == 1
    [message] = mailbox.to("alice@example.org")
    assert message["Subject"] == "Garage rig fell to Anchored"
    text = body(message)
    assert "from Harbor to Anchored: it is now 39.00" in text
    assert '"Job job-1 timed out"' in text
    assert "/reference/karma" in text


def test_a_score_hovering_at_a_boundary_is_told_once_a_day(alice):
    island = make_island(alice)
    with time_machine.travel(T0, tick=False):
        adjust(island, "-11")
    with time_machine.travel(T0 + timedelta(hours=1), tick=False):
        adjust(island, "2")
        adjust(island, "-2")
    assert Notification.objects.filter(kind="island.karma_level").count() == 1
    with time_machine.travel(T0 + timedelta(days=1, minutes=1), tick=False):
        adjust(island, "2")
    rises = Notification.objects.filter(kind="island.karma_level", data__direction="up")
    assert rises.count() == 1 and rises.get().data["to_level"] == "Harbor"


def test_an_event_within_a_level_tells_nothing(alice):
    island = make_island(alice)
    adjust(island, "5")
    adjust(island, "-9")
    assert not Notification.objects.filter(kind="island.karma_level").exists()


def test_moving_a_threshold_reclassifies_without_a_message(alice, monkeypatch):
    island = make_island(alice)
    adjust(island, "-5")  # 45: Harbor
    # Harbor begins at 50 again: the Island now reads as Anchored, and nothing is sent;
    # its next event, within the new Anchored, tells nothing either.
    moved = tuple(
        rules.Level(level.name, Decimal(50) if level.name == "Harbor" else level.threshold, level.meaning)
        for level in rules.LEVELS
    )
    monkeypatch.setattr(rules, "LEVELS", moved)
    assert not Notification.objects.exists()
    adjust(island, "-1")
    assert not Notification.objects.exists()
