"""Offline and back-online alerts: written by the watcher, sent after the owner's grace, read over SMTP."""

from datetime import timedelta

import pytest
from django.test import Client

from archipelag.management.commands.watch_islands import Command
from islands.models import Island
from notify.models import Delivery, Notification, Preferences
from notify.sender import send_due
from tests.islands.conftest import T0, beat, make_island
from tests.notify.conftest import body

DEADLINE = T0 + timedelta(seconds=45)  # the heartbeat at T0 counts until then


def step(now):
    return Command().handle_one(now)


@pytest.fixture
def island(alice):
    island = make_island(alice, name="Garage rig")
    beat(island, T0)
    return island


def kill(island):
    """The Island stops at T0 without signing off; the watcher records it at its deadline."""
    step(DEADLINE + timedelta(seconds=1))


def subjects(mailbox):
    return [str(message["Subject"]) for message in mailbox.messages]


def test_offline_alert_is_sent_after_the_default_grace_with_when_charges_begin(island, mailbox):
    kill(island)
    notification = Notification.objects.get(kind="island.offline")
    assert notification.island_id == island.pk
    # Written with the silence, due five minutes after the deadline.
    assert Delivery.objects.get().next_attempt_at == DEADLINE + timedelta(minutes=5)
    assert send_due(DEADLINE + timedelta(minutes=4, seconds=59)) == 0
    assert mailbox.messages == []

    assert send_due(DEADLINE + timedelta(minutes=5)) == 1
    [message] = mailbox.to("alice@example.org")
    assert message["Subject"] == "Garage rig is offline"
    text = body(message)
    assert "stopped sending heartbeats at 2026-03-01 12:00 UTC" in text
    assert "karma charges begin at 2026-03-01 12:15 UTC" in text
    assert "/notifications/unsubscribe/" in text
    assert message["List-Unsubscribe"].startswith("<http")


def test_the_owner_chooses_the_grace(island, alice, mailbox):
    Preferences.objects.create(user=alice, offline_grace_minutes=20)
    kill(island)
    assert send_due(DEADLINE + timedelta(minutes=19)) == 0
    assert send_due(DEADLINE + timedelta(minutes=20)) == 1


def test_the_environment_sets_the_default_grace(island, settings, mailbox):
    settings.NOTIFY_OFFLINE_GRACE = 0
    kill(island)
    assert send_due(DEADLINE + timedelta(seconds=1)) == 1


def test_back_within_the_grace_sends_neither_message(island, mailbox):
    kill(island)
    beat(island, DEADLINE + timedelta(minutes=3))
    assert send_due(DEADLINE + timedelta(minutes=5)) == 0
    assert Delivery.objects.get().status == Delivery.Status.SKIPPED
    step(DEADLINE + timedelta(minutes=6))
    assert not Notification.objects.filter(kind="island.online").exists()
    assert send_due(DEADLINE + timedelta(minutes=7)) == 0
    assert mailbox.messages == []


def test_back_online_says_how_long_it_was_away_and_what_it_cost(island, mailbox):
    kill(island)
    send_due(DEADLINE + timedelta(minutes=5))
    # Back 40 minutes after its deadline: two disconnection charges (at 15 and 30 minutes).
    back = DEADLINE + timedelta(minutes=40)
    beat(island, back)
    step(back + timedelta(seconds=1))
    assert send_due(back + timedelta(seconds=2)) == 1
    assert subjects(mailbox) == ["Garage rig is offline", "Garage rig is back online"]
    text = body(mailbox.messages[1])
    assert "is back at 2026-03-01 12:40 UTC, after 40 min away" in text
    assert "The silence cost 2.00 karma." in text
    online = Notification.objects.get(kind="island.online")
    assert online.data["away_seconds"] == 40 * 60 + 45
    assert online.data["karma_cost"] == "2.00"


def test_a_short_absence_past_the_grace_costs_nothing(island, mailbox):
    kill(island)
    send_due(DEADLINE + timedelta(minutes=5))
    beat(island, DEADLINE + timedelta(minutes=8))
    step(DEADLINE + timedelta(minutes=8, seconds=1))
    send_due(DEADLINE + timedelta(minutes=8, seconds=2))
    assert "The silence cost no karma." in body(mailbox.messages[-1])


def test_two_watchers_write_one_back_online_message(island, mailbox):
    kill(island)
    beat(island, DEADLINE + timedelta(minutes=10))
    step(DEADLINE + timedelta(minutes=11))
    step(DEADLINE + timedelta(minutes=11))
    assert Notification.objects.filter(kind="island.online").count() == 1


def test_a_graceful_sign_off_sends_nothing(island, mailbox):
    beat(island, T0 + timedelta(seconds=10), "offline")
    step(T0 + timedelta(hours=2))
    assert Notification.objects.count() == 0
    assert send_due(T0 + timedelta(hours=2)) == 0


def test_a_switched_off_kind_or_a_muted_island_sends_nothing(island, alice, mailbox):
    preferences = Preferences.objects.create(user=alice, offline=False)
    kill(island)
    assert not Delivery.objects.exists()
    preferences.offline = True
    preferences.muted_islands = [str(island.pk)]
    preferences.save()
    beat(island, DEADLINE + timedelta(minutes=30))
    step(DEADLINE + timedelta(minutes=31))
    assert not Delivery.objects.exists()


def test_a_flapping_island_gets_one_summary_at_the_end_of_the_hour(island, mailbox):
    # Down 6 minutes, up 4, from 12:00: each silence outlasts the 5-minute grace.
    at = T0
    for _ in range(4):
        deadline = at + timedelta(seconds=45)
        step(deadline + timedelta(seconds=1))
        send_due(deadline + timedelta(minutes=5, seconds=1))
        at = deadline + timedelta(minutes=6)
        beat(island, at)
        step(at + timedelta(seconds=1))
        send_due(at + timedelta(seconds=2))
    individual = subjects(mailbox)
    # The first ones go out before the Island counts as flapping (more than 3
    # transitions in an hour); after that, nothing until the hour ends.
    assert individual == [
        "Garage rig is offline",
        "Garage rig is back online",
        "Garage rig is offline",
    ]
    assert send_due(T0 + timedelta(minutes=59)) == 0
    assert send_due(T0 + timedelta(hours=1)) == 1
    summary = mailbox.messages[-1]
    assert summary["Subject"] == "Garage rig kept going up and down"
    assert "went offline 4 times between 12:00 and 13:00 UTC" in body(summary)
    assert Notification.objects.filter(kind="island.flapping").count() == 1


def test_the_unsubscribe_link_asks_on_get_and_turns_off_on_post(island, alice, mailbox):
    kill(island)
    send_due(DEADLINE + timedelta(minutes=5))
    link = next(line for line in body(mailbox.messages[0]).splitlines() if "/unsubscribe/" in line)
    path = link.split("http://127.0.0.1:8000", 1)[1]
    client = Client()
    page = client.get(path)
    assert page.status_code == 200 and "Island offline" in page.content.decode()
    assert Preferences.objects.of(alice).offline
    # The one-click POST a mail client sends carries no cookie and no CSRF token.
    done = Client(enforce_csrf_checks=True).post(path, {"List-Unsubscribe": "One-Click"})
    assert done.status_code == 200 and "Unsubscribed" in done.content.decode()
    preferences = Preferences.objects.of(alice)
    assert not preferences.offline and preferences.online


def test_a_forged_unsubscribe_link_changes_nothing(client):
    response = client.post("/notifications/unsubscribe/forged/")
    assert response.status_code == 400


def test_settings_page_saves_grace_switches_and_mutes(alice_client, alice, island):
    page = alice_client.get("/settings/notifications")
    assert page.status_code == 200 and 'value="5"' in page.content.decode()
    response = alice_client.post(
        "/settings/notifications",
        {"offline_grace_minutes": "15", "offline": "on", "linked": "on", "muted_islands": [str(island.pk)]},
    )
    assert response.status_code == 302
    preferences = Preferences.objects.get(user=alice)
    assert preferences.offline_grace_minutes == 15
    assert (preferences.offline, preferences.online, preferences.linked, preferences.karma_level) == (
        True,
        False,
        True,
        False,
    )
    assert preferences.muted_islands == [str(island.pk)]


def test_a_grace_over_an_hour_is_refused_with_the_form(alice_client, alice):
    response = alice_client.post("/settings/notifications", {"offline_grace_minutes": "61"})
    assert response.status_code == 400
    assert "less than or equal to 60" in response.content.decode()
    assert not Preferences.objects.filter(user=alice).exists()


def test_island_status_is_untouched_by_alerts(island):
    kill(island)
    island.refresh_from_db()
    assert island.status == Island.Status.OFFLINE


def test_the_watcher_s_step_only_writes_rows_and_never_waits_on_mail(island, mailbox):
    # A mail server that takes ages: the step does not touch it (the sender thread does).
    mailbox.delay = 30
    kill(island)
    step(DEADLINE + timedelta(minutes=10))
    assert mailbox.messages == []
    assert Delivery.objects.get().status == "pending"
