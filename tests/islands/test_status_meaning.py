"""What each status means, on the model and on the card: one test per status."""

import re
from datetime import timedelta

import time_machine

from islands.models import Island
from tests.islands.conftest import T0, beat, make_island

THRESHOLD = timedelta(seconds=45)  # settings.ISLAND_OFFLINE_AFTER in tests


def status_text(client, island, when):
    """The card's one status: its badge, then the line saying what it means, if any."""
    with time_machine.travel(when, tick=False):
        html = client.get("/settings").content.decode()
    start = html.index(f'data-island="{island.pk}"')
    card = html[start : html.index("</article>", start)]
    assert "<dt>Status</dt>" not in card  # said once, not in the badge and again in a row
    (badge,) = re.findall(r'<span class="status [^"]*" data-status="[^"]*">(.*?)</span>', card, re.S)
    lines = re.findall(r'<p class="status-text[^"]*">(.*?)</p>', card, re.S)
    assert len(lines) <= 1
    return " — ".join(" ".join(re.sub(r"<[^>]+>", " ", part).split()) for part in [badge, *lines])


def test_a_linked_island_without_heartbeat_is_waiting_not_offline(alice, alice_client):
    island = make_island(alice)
    assert island.status_at(T0) == Island.LiveStatus.NEW
    assert list(Island.objects.shown_as(Island.LiveStatus.NEW, T0)) == [island]
    assert not Island.objects.shown_as(Island.LiveStatus.OFFLINE, T0).exists()
    assert status_text(alice_client, island, T0).startswith("Waiting for its first heartbeat")


def test_an_online_island_is_online(alice, alice_client):
    island = make_island(alice)
    beat(island, T0)
    island.refresh_from_db()
    assert island.status_at(T0 + timedelta(seconds=44)) == Island.LiveStatus.ONLINE
    assert status_text(alice_client, island, T0 + timedelta(seconds=44)) == "Online"


def test_a_silent_island_is_down_and_says_when_karma_charges_begin(alice, alice_client):
    island = make_island(alice)
    beat(island, T0)
    island.refresh_from_db()
    # Silent from the deadline (T0 + 45 s); the first charge is 15 minutes later.
    assert island.karma_charged_from == T0 + THRESHOLD + timedelta(minutes=15)
    assert island.status_at(T0 + timedelta(minutes=1)) == Island.LiveStatus.OFFLINE
    soon = status_text(alice_client, island, T0 + timedelta(minutes=1))
    assert soon == "Down — Without signing off: costs karma from 12:15 UTC"
    later = status_text(alice_client, island, T0 + timedelta(minutes=20))
    assert later == "Down — Without signing off: costing karma since 12:15 UTC"
    assert list(Island.objects.shown_as(Island.LiveStatus.OFFLINE, T0 + timedelta(minutes=1))) == [island]


def test_a_signed_off_island_costs_nothing(alice, alice_client):
    island = make_island(alice)
    beat(island, T0)
    beat(island, T0 + timedelta(seconds=1), status="offline")
    island.refresh_from_db()
    assert island.status_at(T0 + timedelta(hours=1)) == Island.LiveStatus.SIGNED_OFF
    text = status_text(alice_client, island, T0 + timedelta(hours=1))
    assert text == "Signed off — Offline, no karma charge"
    assert "karma from" not in text


def test_a_suspended_island_is_suspended_whatever_its_heartbeats(alice, alice_client):
    island = make_island(alice, suspended_at=T0)
    beat(island, T0)
    island.refresh_from_db()
    assert island.status_at(T0) == Island.LiveStatus.SUSPENDED
    assert status_text(alice_client, island, T0) == "Suspended — By an administrator: gets no jobs"


def test_the_card_shows_the_island_id_the_job_api_wants_with_a_copy_button(alice, alice_client):
    island = make_island(alice)
    html = alice_client.get("/settings").content.decode()
    assert f'<code class="island-id" id="island-id-{island.pk}">{island.pk}</code>' in html
    assert f'data-copy="{island.pk}"' in html
    detail = alice_client.get(f"/settings/islands/{island.pk}").content.decode()
    assert f'data-copy="{island.pk}"' in detail
