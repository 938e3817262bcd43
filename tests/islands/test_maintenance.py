"""Maintenance windows: announced by the owner on the card or by the Island over the API; no silence
charges, no offline alerts and no new jobs during one; at most 24 hours at a time and per 7 days."""

from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine

from archipelag.management.commands.watch_islands import Command
from islands.models import Island, JobSpec, MaintenanceWindow
from karma.models import KarmaEvent
from tests.islands.conftest import T0, beat, make_island, post_json

URL = "/api/v1/islands/maintenance"
DEADLINE = T0 + timedelta(seconds=45)


def iso(moment):
    return moment.isoformat().replace("+00:00", "Z")


def step(now):
    return Command().handle_one(now)


def charges(island):
    return list(
        KarmaEvent.objects.filter(island=island, cause=KarmaEvent.Cause.DISCONNECTION)
        .order_by("step")
        .values_list("step", flat=True)
    )


@pytest.fixture
def announce(client, token):
    def send(until, at=T0):
        with time_machine.travel(at, tick=False):
            return post_json(client, URL, {"until": until if until is None else iso(until)}, token)

    return send


def test_the_island_announces_and_ends_a_window_with_its_token(announce, island):
    response = announce(T0 + timedelta(hours=2))
    assert response.status_code == 200
    assert response.json() == {"success": True, "maintenance_until": "2026-03-01T14:00:00Z"}
    island.refresh_from_db()
    assert island.maintenance_until == T0 + timedelta(hours=2)
    window = MaintenanceWindow.objects.get()
    assert (window.starts_at, window.announced_by) == (T0, "island")

    ended = announce(None, at=T0 + timedelta(minutes=30))
    assert ended.json() == {"success": True, "maintenance_until": None}
    window.refresh_from_db()
    assert window.ends_at == T0 + timedelta(minutes=30)
    island.refresh_from_db()
    assert island.maintenance_until is None


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"until": iso(T0 + timedelta(hours=24, seconds=1))}, "at most 24 hours"),
        ({"until": iso(T0 - timedelta(minutes=1))}, "in the future"),
        ({"until": "2026-03-01T14:00:00"}, "UTC"),
        ({"until": "tomorrow"}, "until"),
        ({"until": 5}, "until"),
        ({}, "until"),
        ({"until": None, "extra": 1}, "extra"),
    ],
)
def test_bad_announcements_are_refused_with_a_json_error(client, token, island, body, error):
    with time_machine.travel(T0, tick=False):
        response = post_json(client, URL, body, token)
    assert response.status_code == 400
    answer = response.json()
    assert answer["success"] is False and error in answer["error"]
    assert not MaintenanceWindow.objects.exists()


def test_an_unknown_token_is_refused(client, island):
    response = post_json(client, URL, {"until": None}, "isl_nope")
    assert response.status_code == 401 and response.json()["success"] is False


def test_at_most_24_hours_per_7_days(announce, island):
    assert announce(T0 + timedelta(hours=20)).status_code == 200
    assert announce(None, at=T0 + timedelta(hours=20)).status_code == 200
    # Three days later: 4 hours of the budget are left.
    later = T0 + timedelta(days=3)
    refused = announce(later + timedelta(hours=5), at=later)
    assert refused.status_code == 400 and "4 h 0 min are left" in refused.json()["error"]
    assert announce(later + timedelta(hours=4), at=later).status_code == 200
    # A week after the first window, its hours count no more.
    week = T0 + timedelta(days=7, hours=20)
    assert announce(week + timedelta(hours=20), at=week).status_code == 200


def test_no_silence_charges_from_the_window_s_start(announce, island):
    beat(island, T0)
    step(DEADLINE + timedelta(minutes=16))
    assert charges(island) == [1]  # charged at 15 minutes, before any window
    # Announced during the silence, for two hours: the steps due meanwhile are not charged.
    announce(DEADLINE + timedelta(hours=2, minutes=20), at=DEADLINE + timedelta(minutes=20))
    step(DEADLINE + timedelta(hours=2))
    assert charges(island) == [1]
    # Still silent when it ends: charged again from the next step.
    step(DEADLINE + timedelta(hours=2, minutes=31))
    assert charges(island) == [1, 10]


def test_no_new_jobs_are_placed_during_a_window(announce, island):
    beat(island, T0)
    announce(T0 + timedelta(hours=1), at=T0 + timedelta(seconds=1))
    spec = JobSpec(job_id="job-1", workload="llm-chat", lease=timedelta(minutes=5), budget=Decimal(1))
    now = T0 + timedelta(seconds=2)
    assert not Island.objects.placeable(spec, now).exists()
    assert Island.objects.exclusions(spec, now)["maintenance"] == 1
    beat(island, T0 + timedelta(hours=1))
    assert Island.objects.placeable(spec, T0 + timedelta(hours=1, seconds=1)).filter(pk=island.pk).exists()


def test_the_card_announces_shows_and_ends_maintenance(alice_client, alice):
    island = make_island(alice, name="Garage rig")
    with time_machine.travel(T0, tick=False):
        response = alice_client.post(f"/settings/islands/{island.pk}/maintenance", {"until": "14:00"})
        assert response.status_code == 302
        page = alice_client.get("/settings").content.decode()
    assert "Maintenance until 14:00 UTC" in page
    island.refresh_from_db()
    assert island.maintenance_until == T0 + timedelta(hours=2)
    assert MaintenanceWindow.objects.get().announced_by == "owner"
    with time_machine.travel(T0 + timedelta(minutes=5), tick=False):
        alice_client.post(f"/settings/islands/{island.pk}/maintenance", {"end": "1"})
        page = alice_client.get("/settings").content.decode()
    assert "Maintenance until" not in page


def test_a_time_earlier_today_means_tomorrow_and_over_24_hours_is_refused(alice_client, alice):
    island = make_island(alice)
    with time_machine.travel(T0, tick=False):
        alice_client.post(f"/settings/islands/{island.pk}/maintenance", {"until": "11:00"})
        island.refresh_from_db()
        assert island.maintenance_until == T0 + timedelta(hours=23)
        alice_client.post(f"/settings/islands/{island.pk}/maintenance", {"end": "1"})
        page = alice_client.post(
            f"/settings/islands/{island.pk}/maintenance", {"until": "nonsense"}, follow=True
        ).content.decode()
    assert "Give a time such as 14:00." in page


def test_another_account_cannot_announce_for_an_island(bob_client, island):
    response = bob_client.post(f"/settings/islands/{island.pk}/maintenance", {"until": "14:00"})
    assert response.status_code == 404
    assert not MaintenanceWindow.objects.exists()
