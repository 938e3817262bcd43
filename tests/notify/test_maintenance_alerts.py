"""Offline alerts and maintenance windows: held during one, dropped after a return within it."""

from datetime import timedelta

import pytest

from archipelag.management.commands.watch_islands import Command
from islands.models import MaintenanceWindow
from notify.models import Delivery, Notification
from notify.sender import send_due
from tests.islands.conftest import T0, beat, make_island

DEADLINE = T0 + timedelta(seconds=45)


@pytest.fixture
def island(alice):
    return make_island(alice)


def step(now):
    return Command().handle_one(now)


def announce(island, until, at):
    MaintenanceWindow.objects.announce(island, until, MaintenanceWindow.By.ISLAND, at)


def test_no_offline_alert_during_a_window_and_none_after_a_return_within_it(island, mailbox):
    beat(island, T0)
    announce(island, T0 + timedelta(hours=1), at=T0 + timedelta(seconds=10))
    step(DEADLINE + timedelta(seconds=1))
    assert send_due(DEADLINE + timedelta(minutes=5)) == 0
    # Held until the window ends, not sent and not given up.
    delivery = Delivery.objects.get()
    assert delivery.status == "pending" and delivery.next_attempt_at == T0 + timedelta(hours=1)
    assert delivery.attempts == 0
    beat(island, T0 + timedelta(minutes=50))
    step(T0 + timedelta(minutes=50, seconds=1))
    assert send_due(T0 + timedelta(hours=1)) == 0
    assert Delivery.objects.get().status == "skipped"
    assert not Notification.objects.filter(kind="island.online").exists()
    assert mailbox.messages == []


def test_still_down_when_the_window_ends_the_owner_is_told(island, mailbox):
    beat(island, T0)
    announce(island, T0 + timedelta(hours=1), at=T0 + timedelta(seconds=10))
    step(DEADLINE + timedelta(seconds=1))
    send_due(DEADLINE + timedelta(minutes=5))
    assert send_due(T0 + timedelta(hours=1)) == 1
    assert mailbox.messages[0]["Subject"].endswith("is offline")
