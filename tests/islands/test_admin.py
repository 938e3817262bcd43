"""The admin: live status, filters, search, read-only ledger and attempts, remove, suspend, cancel."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.test import Client

from islands.models import (
    RULES,
    Attempt,
    DispatcherKey,
    Island,
    IslandQuerySet,
    Job,
    OutboxMessage,
    StatusChange,
)
from karma.models import KarmaEvent
from tests.conftest import admin_column
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
        Live.OFFLINE: [silent],
        Live.NEW: [never],
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
            "attempts-TOTAL_FORMS": "50",
            "attempts-INITIAL_FORMS": "50",
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


def test_an_admin_is_told_why_an_offline_island_cannot_take_a_job(admin_client, island):
    # Paired, never heard from: offline by the clock.
    response = admin_client.post(
        f"{JOBS}add/",
        {
            "job_id": "manual-1",
            "island": island.pk,
            "workload": "llm-chat",
            "credits": "2",
            "lease_seconds": 60,
        },
    )
    assert response.status_code == 200
    page = response.content.decode()
    assert "This Island cannot take the job: it is offline." in page
    assert 'class="errornote"' in page
    # What was typed is kept for another try.
    assert 'value="manual-1"' in page
    assert not Job.objects.exists() and not Attempt.objects.exists()
    island.refresh_from_db()
    assert island.jobs_running == 0


def test_an_island_that_fills_up_between_the_check_and_the_placement_records_nothing(
    admin_client, island, monkeypatch
):
    beat(island, T0)
    give_job(island=island, job_id="already-there")  # its one slot is taken
    # As if the form checked it a moment before the other job took the slot.
    monkeypatch.setattr(IslandQuerySet, "exclusions", lambda self, spec, now: dict.fromkeys(RULES, 0))
    with time_machine.travel(T0, tick=False):
        response = admin_client.post(
            f"{JOBS}add/",
            {"job_id": "late-1", "island": island.pk, "workload": "w", "credits": "1", "lease_seconds": 60},
            follow=True,
        )
    assert response.status_code == 200
    assert (
        "The job was not recorded: this Island cannot take the job: it is running as many jobs as it can"
        in (response.content.decode())
    )
    assert response.redirect_chain == [(f"{JOBS}add/", 302)]
    assert list(Job.objects.values_list("job_id", flat=True)) == ["already-there"]
    island.refresh_from_db()
    assert island.jobs_running == 1


# --- Attempts -------------------------------------------------------------------------


@pytest.fixture
def moved_job(alice, bob):
    """A job that timed out on Alice's Island and was placed again on Bob's."""
    first = make_island(alice, "first-host-0001", name="First home")
    second = make_island(bob, "second-host-001", name="Second home")
    beat([first, second], T0)
    give_job(island=first, job_id="moving-1", credits=Decimal("1.5"), lease=timedelta(seconds=30), now=T0)
    Job.objects.apply_status(first, "moving-1", "started", now=T0 + timedelta(seconds=2))
    later = T0 + timedelta(seconds=40)
    beat(second, later)
    assert Job.objects.time_out_expired(later) == ["moving-1"]
    assert Job.objects.place_queued(later) == 1
    job = Job.objects.get(job_id="moving-1")
    assert (job.island, job.attempt) == (second, 2)
    return job, first, second


def test_a_jobs_page_shows_each_attempt_read_only(admin_client, moved_job):
    job, first, second = moved_job
    page = admin_client.get(f"{JOBS}{job.pk}/change/").content.decode()
    assert re.search(r'<h2 id="attempts-heading"[^>]*>\s*Attempts\s*</h2>', page)
    assert admin_column(page, "number") == ["1", "2"]
    assert admin_column(page, "island") == ["First home", "Second home"]
    assert admin_column(page, "ending") == ["Timed out", "Not ended yet"]
    assert admin_column(page, "credits") == ["1.5000", "1.5000"]
    assert "moving-1 #1" in page and "moving-1 #2" in page
    # Each Island is a link to its page; nothing of an attempt can be edited.
    assert f'<a href="/admin/islands/island/{first.pk}/change/">First home</a>' in page
    assert f'<a href="/admin/islands/island/{second.pk}/change/">Second home</a>' in page
    assert not re.search(r'name="attempts-\d+-(?!id"|job")', page)


def test_an_islands_page_shows_its_attempts_even_of_jobs_that_moved_on(admin_client, moved_job):
    _, first, _ = moved_job
    page = admin_client.get(f"{ISLANDS}{first.pk}/change/").content.decode()
    assert "Attempts (newest 50)" in page
    attempts = page[page.index("Attempts (newest 50)") : page.index("Status changes (newest")]
    assert admin_column(attempts, "job") == ["moving-1"]
    assert admin_column(attempts, "ending") == ["Timed out"]
    # The job ledger lists the jobs the Island holds now: this one moved on.
    ledger = page[page.index("Job ledger (newest 50)") : page.index("Attempts (newest 50)")]
    assert "moving-1" not in ledger
    assert f"/admin/islands/attempt/?island__id__exact={first.pk}" in page


def test_an_islands_page_lists_its_newest_attempts_only(admin_client, island):
    for n in range(55):
        give_job(island=island, job_id=f"job-{n:04d}", now=T0 + timedelta(seconds=n))
    page = admin_client.get(f"{ISLANDS}{island.pk}/change/").content.decode()
    attempts = page[page.index("Attempts (newest 50)") : page.index("Status changes (newest")]
    assert attempts.index("job-0054") < attempts.index("job-0053") < attempts.index("job-0005")
    assert "job-0004" not in attempts
    listing = admin_client.get("/admin/islands/attempt/", {"island__id__exact": str(island.pk)})
    assert len(listing.context["cl"].result_list) == 55


def test_attempts_are_listed_read_only(admin_client, moved_job):
    listing = admin_client.get("/admin/islands/attempt/", {"outcome__exact": "timed_out"}).content.decode()
    assert admin_column(listing, "island") == ["First home"]
    attempt = Attempt.objects.get(number=1)
    assert admin_client.get("/admin/islands/attempt/add/").status_code == 403
    assert (
        admin_client.post(f"/admin/islands/attempt/{attempt.pk}/change/", {"credits": "9"}).status_code == 403
    )
    assert (
        admin_client.post(f"/admin/islands/attempt/{attempt.pk}/delete/", {"post": "yes"}).status_code == 403
    )


def test_outbox_messages_are_listed_read_only(admin_client, alice):
    nats = make_island(alice, "nats-host-0001", transport=Island.Transport.NATS)
    beat(nats, T0)
    give_job(island=nats, job_id="to-deliver", now=T0)
    message = OutboxMessage.objects.get()
    OutboxMessage.objects.filter(pk=message.pk).update(tries=2, last_error="no responders")
    listing = admin_client.get("/admin/islands/outboxmessage/", {"sent_at__isempty": "1"}).content.decode()
    assert re.search(r"<th class=\"field-msg_id\"><a [^>]*>to-deliver:1</a></th>", listing)
    assert admin_column(listing, "subject") == ["host.nats-host-0001.jobs"]
    assert admin_column(listing, "last_error") == ["no responders"]
    page = admin_client.get(f"/admin/islands/outboxmessage/{message.pk}/change/").content.decode()
    assert "&quot;job_id&quot;:&quot;to-deliver&quot;" in page
    assert admin_client.get("/admin/islands/outboxmessage/add/").status_code == 403
    assert (
        admin_client.post(f"/admin/islands/outboxmessage/{message.pk}/change/", {"tries": "0"}).status_code
        == 403
    )
    assert (
        admin_client.post(f"/admin/islands/outboxmessage/{message.pk}/delete/", {"post": "yes"}).status_code
        == 403
    )
    assert OutboxMessage.objects.get().tries == 2


# --- Cancelling jobs ------------------------------------------------------------------


def staff_member(username: str, *codenames: str) -> Client:
    user = User.objects.create_user(username, f"{username}@example.com", "x", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="islands", codename__in=codenames)
    )
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def three_jobs(island):
    """Two jobs that have not ended (one running, one waiting) and one that succeeded."""
    for job_id in ("run-1", "wait-1", "done-1"):
        give_job(island=island, job_id=job_id, credits=Decimal(2))
    Job.objects.apply_status(island, "run-1", "started")
    Job.objects.apply_status(island, "done-1", "started")
    Job.objects.apply_status(island, "done-1", "succeeded")
    return {job.job_id: job for job in Job.objects.all()}


def test_staff_cancel_unfinished_jobs_and_finished_ones_are_skipped(
    admin_client, admin_user, island, three_jobs
):
    response = admin_client.post(
        JOBS,
        {"action": "cancel_jobs", "_selected_action": [job.pk for job in three_jobs.values()]},
        follow=True,
    )
    page = response.content.decode()
    assert "Cancelled 2 job(s); their Islands are told to stop and lose no karma." in page
    assert "Skipped 1 job(s) that had already ended." in page
    states = dict(Job.objects.values_list("job_id", "state"))
    assert states == {"run-1": "cancelled", "wait-1": "cancelled", "done-1": "succeeded"}
    withdrawn = Attempt.objects.filter(outcome=Attempt.Outcome.WITHDRAWN)
    assert sorted(withdrawn.values_list("job__job_id", flat=True)) == ["run-1", "wait-1"]
    island.refresh_from_db()
    assert (island.jobs_running, island.jobs_completed, island.jobs_failed, island.earnings) == (
        0,
        1,
        0,
        Decimal(2),
    )
    # Only the job that succeeded moved karma.
    assert list(KarmaEvent.objects.values_list("job__job_id", flat=True)) == ["done-1"]
    # Who cancelled is in each job's history.
    logged = LogEntry.objects.filter(user=admin_user, change_message="Cancelled the job.")
    assert sorted(logged.values_list("object_repr", flat=True)) == ["run-1", "wait-1"]


def test_the_island_hears_of_a_cancel_in_its_poll(admin_client, client, island, three_jobs):
    token = island.issue_token()
    admin_client.post(JOBS, {"action": "cancel_jobs", "_selected_action": [three_jobs["run-1"].pk]})
    polled = client.post(
        "/api/v1/islands/jobs/poll",
        "{}",
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    ).json()
    assert polled["cancelled"] == ["run-1"]
    assert [job["job_id"] for job in polled["jobs"]] == ["wait-1"]


def test_cancelling_only_finished_jobs_says_so(admin_client, three_jobs):
    response = admin_client.post(
        JOBS, {"action": "cancel_jobs", "_selected_action": [three_jobs["done-1"].pk]}, follow=True
    )
    assert [str(message) for message in response.context["messages"]] == [
        "Skipped 1 job(s) that had already ended."
    ]
    assert Job.objects.get(job_id="done-1").state == Job.State.SUCCEEDED


def test_staff_who_may_change_jobs_cancel_them_but_cannot_edit_one(db, three_jobs):
    operator = staff_member("operator", "view_job", "change_job")
    listing = operator.get(JOBS).content.decode()
    assert '<option value="cancel_jobs">' in listing
    job = three_jobs["wait-1"]
    page = operator.get(f"{JOBS}{job.pk}/change/").content.decode()
    assert 'name="_save"' not in page and 'name="credits"' not in page
    assert operator.post(f"{JOBS}{job.pk}/change/", {"credits": "400"}).status_code == 403
    operator.post(JOBS, {"action": "cancel_jobs", "_selected_action": [job.pk]})
    job.refresh_from_db()
    assert (job.state, job.credits) == (Job.State.CANCELLED, Decimal(2))


def test_staff_who_may_only_view_jobs_can_neither_see_nor_post_the_cancel(db, three_jobs):
    viewer = staff_member("viewer", "view_job")
    listing = viewer.get(JOBS)
    assert listing.status_code == 200
    assert "cancel_jobs" not in listing.content.decode()
    job = three_jobs["run-1"]
    response = viewer.post(JOBS, {"action": "cancel_jobs", "_selected_action": [job.pk]}, follow=True)
    # Without an action it may run, the changelist treats the post as a look at the list.
    assert response.status_code == 200
    assert list(response.context["messages"]) == []
    job.refresh_from_db()
    assert job.state == Job.State.STARTED
    assert not Attempt.objects.filter(outcome=Attempt.Outcome.WITHDRAWN).exists()
    assert viewer.post(f"{JOBS}{job.pk}/change/", {"credits": "400"}).status_code == 403
