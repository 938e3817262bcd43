"""The admin: the karma ledger read-only and filterable, and manual adjustments with a reason."""

from datetime import timedelta
from decimal import Decimal

import pytest

from islands.models import Island
from karma.models import KarmaEvent, UptimeSweep
from tests.karma.conftest import T0, beat, events, karma, make_island, run_job, watch

EVENTS = "/admin/karma/karmaevent/"
ISLANDS = "/admin/islands/island/"


@pytest.fixture
def history(alice, bob):
    """Events of every automatic kind, on two Islands."""
    garage = make_island(alice, "garage-host-001", name="Garage rig")
    run_job(garage, "job-1", T0, "succeeded", timedelta(seconds=2))
    run_job(garage, "job-2", T0, "failed", timedelta(seconds=2))
    attic = make_island(bob, "attic-host-0001", name="Attic box")
    beat(attic, T0)
    watch(T0 + timedelta(minutes=20))
    return garage, attic


def listed(response):
    return list(response.context["cl"].result_list)


def test_the_ledger_lists_every_event(admin_client, history):
    response = admin_client.get(EVENTS)
    assert response.status_code == 200
    assert len(listed(response)) == 3
    html = response.content.decode()
    assert "Job job-2 failed" in html and "Offline without signing off for 15 min" in html


def test_the_ledger_filters_by_cause_island_and_date(admin_client, history):
    garage, attic = history
    assert {e.cause for e in listed(admin_client.get(EVENTS, {"cause__exact": "job"}))} == {"job"}
    assert {e.island for e in listed(admin_client.get(EVENTS, {"island__id__exact": str(attic.pk)}))} == {
        attic
    }
    day = {"effective_at__year": "2026", "effective_at__month": "3", "effective_at__day": "1"}
    assert len(listed(admin_client.get(EVENTS, day))) == 3
    assert listed(admin_client.get(EVENTS, {**day, "effective_at__day": "2"})) == []
    assert {e.island for e in listed(admin_client.get(EVENTS, {"q": "Garage"}))} == {garage}


def test_the_ledger_is_read_only(admin_client, history):
    event = KarmaEvent.objects.get(job__job_id="job-1")
    assert admin_client.get(f"{EVENTS}add/").status_code == 403
    page = admin_client.get(f"{EVENTS}{event.pk}/change/")
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
    assert admin_client.post(f"{EVENTS}{event.pk}/change/", {"delta": "99"}).status_code == 403
    assert admin_client.post(f"{EVENTS}{event.pk}/delete/", {"post": "yes"}).status_code == 403
    event.refresh_from_db()
    assert event.delta == Decimal("1")


def test_an_administrator_adjusts_karma_with_a_reason(admin_client, admin_user, alice, bob):
    one, two = make_island(alice, "adjust-host-001"), make_island(bob, "adjust-host-002")
    selected = {"action": "adjust_karma", "_selected_action": [str(one.pk), str(two.pk)]}
    form = admin_client.post(ISLANDS, selected)
    assert form.status_code == 200
    assert "Adjust karma" in form.content.decode() and "adjust-host-002" in form.content.decode()
    assert KarmaEvent.objects.count() == 0

    done = admin_client.post(
        ISLANDS, {**selected, "apply": "1", "delta": "-7.5", "reason": "Benchmark cheating"}, follow=True
    )
    assert "Adjusted the karma of 2 Island(s) by -7.5." in done.content.decode()
    for island in (one, two):
        [event] = events(island)
        assert (event.cause, event.delta, event.reason, event.actor) == (
            KarmaEvent.Cause.ADMIN,
            Decimal("-7.5"),
            "Benchmark cheating",
            admin_user,
        )
        assert karma(island) == Decimal("42.5")


@pytest.mark.parametrize(
    ("delta", "reason", "error"),
    [
        ("5", "   ", "This field is required."),
        ("0", "Nothing", "A change of zero changes nothing."),
        ("150", "Too much", "Ensure this value is less than or equal to 100."),
    ],
)
def test_an_adjustment_without_a_reason_or_size_is_refused(admin_client, alice, delta, reason, error):
    island = make_island(alice)
    response = admin_client.post(
        ISLANDS,
        {
            "action": "adjust_karma",
            "_selected_action": [str(island.pk)],
            "apply": "1",
            "delta": delta,
            "reason": reason,
        },
    )
    assert response.status_code == 200
    assert error in response.content.decode()
    assert KarmaEvent.objects.count() == 0


def test_the_island_page_shows_its_karma_and_newest_events(admin_client, history):
    garage, _ = history
    assert "Karma" in admin_client.get(ISLANDS).content.decode()
    page = admin_client.get(f"{ISLANDS}{garage.pk}/change/").content.decode()
    assert "Karma events (newest 20)" in page
    assert "Job job-1 succeeded; started 2 s after assignment" in page
    # The score is read-only: only events change it.
    assert 'name="karma"' not in page
    assert Island.objects.get(pk=garage.pk).karma == Decimal(49)


def test_judged_days_are_listed_read_only(admin_client, db):
    watch(T0)
    assert UptimeSweep.objects.count() == 1
    assert admin_client.get("/admin/karma/uptimesweep/").status_code == 200
    assert admin_client.get("/admin/karma/uptimesweep/add/").status_code == 403
