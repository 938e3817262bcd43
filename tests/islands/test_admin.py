"""The admin: live status, filters, search, read-only ledger, remove and suspend."""

from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine

from islands.models import DispatcherKey, Island, Job, StatusChange
from tests.islands.conftest import T0, beat, give_job, make_island

ISLANDS = "/admin/islands/island/"
JOBS = "/admin/islands/job/"
KEYS = "/admin/islands/dispatcherkey/"
Live = Island.LiveStatus


@pytest.fixture
def fleet(alice, bob):
    """One Island in every status people can see, at T0 + 10 s."""
    online = make_island(alice, "online-host-0001", name="Online one")
    beat(online, T0)
    silent = make_island(alice, "silent-host-0001", name="Silent one", kind=Island.Kind.MOBILE)
    beat(silent, T0 - timedelta(minutes=5))
    signed_off = make_island(bob, "signed-host-0001", name="Signed-off one")
    beat(signed_off, T0)
    beat(signed_off, T0 + timedelta(seconds=1), status="offline")
    suspended = make_island(bob, "suspnd-host-0001", name="Suspended one", suspended_at=T0)
    beat(suspended, T0)
    removed = make_island(bob, "remove-host-0001", name="Removed one")
    removed.remove()
    never = make_island(alice, "never-host-00001", name="Never seen")
    return {
        Live.ONLINE: [online],
        Live.OFFLINE: [silent, never],
        Live.SIGNED_OFF: [signed_off],
        Live.SUSPENDED: [suspended],
        Live.REMOVED: [removed],
    }


def test_the_list_shows_each_islands_status_now(admin_client, fleet):
    with time_machine.travel(T0 + timedelta(seconds=10), tick=False):
        html = admin_client.get(ISLANDS).content.decode()
    rows = html.split("<tr")
    for status, islands in fleet.items():
        for island in islands:
            (row,) = [row for row in rows if f">{island.name}</a>" in row]
            assert f'<span class="island-status-{status}">{status.label}</span>' in row, island.name


@pytest.mark.parametrize("status", list(Live))
def test_the_status_filter_agrees_with_the_cards(admin_client, fleet, status):
    now = T0 + timedelta(seconds=10)
    with time_machine.travel(now, tick=False):
        response = admin_client.get(ISLANDS, {"status": status.value})
    shown = {island.pk for island in response.context["cl"].result_list}
    assert shown == {island.pk for island in fleet[status]}
    assert all(Island.objects.get(pk=pk).status_at(now) == status for pk in shown)


def test_filters_by_kind_and_owner(admin_client, fleet, alice):
    phones = admin_client.get(ISLANDS, {"kind": "mobile"}).context["cl"].result_list
    assert [island.host_id for island in phones] == ["silent-host-0001"]
    alices = admin_client.get(ISLANDS, {"owner__id__exact": alice.pk}).context["cl"].result_list
    assert {island.owner for island in alices} == {alice}
    assert len(alices) == 3


@pytest.mark.parametrize(
    ("query", "hosts"), [("silent-host", 1), ("Signed-off", 1), ("bob", 3), ("alice@", 3)]
)
def test_search_by_host_id_name_or_owner(admin_client, fleet, query, hosts):
    assert len(admin_client.get(ISLANDS, {"q": query}).context["cl"].result_list) == hosts


def test_the_remove_action_revokes_tokens_at_once(admin_client, alice):
    island = make_island(alice)
    token = island.issue_token()
    response = admin_client.post(
        ISLANDS, {"action": "remove_islands", "_selected_action": [island.pk]}, follow=True
    )
    assert "Removed 1 Island(s)" in response.content.decode()
    island.refresh_from_db()
    assert island.removed_at is not None
    assert Island.objects.authenticate(token) is None


def test_suspending_and_lifting_it(admin_client, alice):
    island = make_island(alice)
    admin_client.post(ISLANDS, {"action": "suspend_islands", "_selected_action": [island.pk]})
    island.refresh_from_db()
    assert island.status_at(T0) == Live.SUSPENDED
    admin_client.post(ISLANDS, {"action": "unsuspend_islands", "_selected_action": [island.pk]})
    island.refresh_from_db()
    assert island.suspended_at is None


def test_islands_cannot_be_deleted_only_removed(admin_client, alice):
    island = make_island(alice)
    assert admin_client.get(f"{ISLANDS}{island.pk}/delete/").status_code == 403
    assert "delete_selected" not in admin_client.get(ISLANDS).content.decode()


def test_the_island_page_shows_its_newest_jobs_read_only(admin_client, alice):
    island = make_island(alice)
    for n in range(60):
        give_job(
            island=island,
            job_id=f"job-{n:04d}",
            workload="llm-chat",
            credits=Decimal(1),
            lease=timedelta(minutes=5),
            now=T0 + timedelta(seconds=n),
        )
    beat(island, T0)
    page = admin_client.get(f"{ISLANDS}{island.pk}/change/").content.decode()
    assert "Job ledger (newest 50)" in page
    assert "job-0059" in page and "job-0010" in page
    assert "job-0009" not in page
    assert 'name="jobs-0-credits"' not in page
    assert "First heartbeat" in page
    assert f"?island__id__exact={island.pk}" in page
    # The counters cannot be edited, and saving the page still works with the inline.
    assert 'name="jobs_completed"' not in page
    response = admin_client.post(
        f"{ISLANDS}{island.pk}/change/",
        {
            "owner": island.owner_id,
            "kind": "desktop",
            "name": "Renamed by admin_client",
            "jobs-TOTAL_FORMS": "50",
            "jobs-INITIAL_FORMS": "50",
            "status_changes-TOTAL_FORMS": "1",
            "status_changes-INITIAL_FORMS": "1",
            "karma_events-TOTAL_FORMS": "0",
            "karma_events-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    island.refresh_from_db()
    assert island.name == "Renamed by admin_client"
    assert Job.objects.count() == 60


def test_jobs_filter_by_state(admin_client, island):
    for n, state in enumerate(["succeeded", "failed", "failed"]):
        give_job(
            island=island, job_id=f"job-{n}", workload="w", credits=Decimal(1), lease=timedelta(minutes=5)
        )
        Job.objects.apply_status(island, f"job-{n}", state)
    failed = admin_client.get(JOBS, {"state__exact": "failed"}).context["cl"].result_list
    assert sorted(job.job_id for job in failed) == ["job-1", "job-2"]


def test_an_admin_can_record_a_job_but_not_edit_one(admin_client, island):
    beat(island, T0)  # placement's rules hold for the admin too: it must be online
    with time_machine.travel(T0, tick=False):
        response = admin_client.post(
            f"{JOBS}add/",
            {
                "job_id": "manual-1",
                "island": island.pk,
                "workload": "llm-chat",
                "credits": "4.25",
                "lease_seconds": 90,
            },
        )
    assert response.status_code == 302, response.content.decode()[:3000]
    job = Job.objects.get()
    assert (job.job_id, job.island, job.credits, job.state) == (
        "manual-1",
        island,
        Decimal("4.25"),
        "assigned",
    )
    assert job.assigned_at == T0
    assert job.lease_expires_at == T0 + timedelta(seconds=90)
    page = admin_client.get(f"{JOBS}{job.pk}/change/").content.decode()
    assert 'name="credits"' not in page
    assert admin_client.post(f"{JOBS}{job.pk}/change/", {"credits": "400"}).status_code == 403
    job.refresh_from_db()
    assert job.credits == Decimal("4.25")


def test_the_admin_gives_no_job_to_a_suspended_or_removed_island(admin_client, alice):
    suspended = make_island(alice, "suspnd-host-0001", suspended_at=T0)
    removed = make_island(alice, "remove-host-0001")
    removed.remove()
    for island in (suspended, removed):
        response = admin_client.post(
            f"{JOBS}add/",
            {
                "job_id": f"j-{island.host_id}",
                "island": island.pk,
                "workload": "w",
                "credits": "1",
                "lease_seconds": 9,
            },
        )
        assert response.status_code == 200
    assert not Job.objects.exists()


def test_dispatcher_keys_are_never_shown(admin_client):
    row, key = DispatcherKey.objects.issue("dispatcher eu-1")
    listing = admin_client.get(KEYS).content.decode()
    page = admin_client.get(f"{KEYS}{row.pk}/change/").content.decode()
    for html in (listing, page):
        assert "dispatcher eu-1" in html
        assert key not in html
        assert row.key_hash not in html
    assert admin_client.get(f"{KEYS}add/").status_code == 403


def test_revoking_a_dispatcher_key(admin_client):
    row, key = DispatcherKey.objects.issue("dispatcher eu-1")
    admin_client.post(KEYS, {"action": "revoke_keys", "_selected_action": [row.pk]})
    assert DispatcherKey.objects.authenticate(key) is None


def test_status_changes_are_listed_read_only(admin_client, island):
    beat(island, T0)
    listing = admin_client.get(
        "/admin/islands/statuschange/", {"reason__exact": "first_heartbeat"}
    ).content.decode()
    assert island.name in listing
    change = StatusChange.objects.get()
    assert admin_client.post(f"/admin/islands/statuschange/{change.pk}/delete/").status_code == 403
