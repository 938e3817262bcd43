"""The job ledger: the dispatcher records jobs, Islands report their states, counters follow."""

import contextlib
import io
import random
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine
from django.core.management import call_command
from django.db import connection
from django.db.models import Count, Q, Sum
from django.utils import timezone

from archipelag.management.commands.watch_islands import Command as Watcher
from islands.models import Attempt, DispatcherKey, Island, Job, JobMoved, JobStateConflict
from tests.islands.conftest import T0, beat, give_job, make_island, post_json

JOBS = "/api/v1/jobs"
POLL = "/api/v1/islands/jobs/poll"
State = Job.State


def status_url(job_id):
    return f"/api/v1/islands/jobs/{job_id}/status"


@pytest.fixture
def dispatcher_key(db):
    _, key = DispatcherKey.objects.issue("test dispatcher")
    return key


@pytest.fixture
def assign(client, dispatcher_key, island):
    """Give a job to a named Island over HTTP (the explicit form); the Island is online, with room."""

    def send(job_id="job-0001", island_id=None, credits="2.5", lease_seconds=60, **extra):
        beat(island, timezone.now(), performance_estimates={"max_concurrent_containers": 8})
        payload = {
            "job_id": job_id,
            "island_id": str(island_id or island.pk),
            "workload": "llm-chat",
            "credits": credits,
            "lease_seconds": lease_seconds,
            **extra,
        }
        return post_json(client, JOBS, payload, dispatcher_key)

    return send


@pytest.fixture
def report(client, token):
    def send(job_id, state, token=token, **extra):
        return post_json(
            client, status_url(job_id), {"state": state, "timestamp": 1710000000000, **extra}, token
        )

    return send


def give(island, job_id="job-0001", credits="2.5", lease=timedelta(minutes=5), now=None):
    return give_job(
        island=island, job_id=job_id, workload="llm-chat", credits=Decimal(credits), lease=lease, now=now
    )


def counters(island):
    island.refresh_from_db()
    return island.jobs_completed, island.jobs_failed, island.earnings


# --- The dispatcher records jobs ------------------------------------------------------


def test_the_dispatcher_records_a_job(assign, island):
    with time_machine.travel(T0, tick=False):
        response = assign()
    assert response.status_code == 201, response.json()
    assert response.json() == {
        "success": True,
        "created": True,
        "job": {
            "job_id": "job-0001",
            "island_id": str(island.pk),
            "host_id": island.host_id,
            "workload": "llm-chat",
            "runtime": "container",
            "credits": "2.5000",
            "budget": "2.5000",
            "state": "assigned",
            "attempt": 1,
            "assigned_at": "2026-03-01T12:00:00+00:00",
            "lease_expires_at": "2026-03-01T12:01:00+00:00",
        },
    }
    job = Job.objects.get()
    assert (job.island, job.state, job.credits) == (island, State.ASSIGNED, Decimal("2.5"))
    assert job.lease_expires_at == T0 + timedelta(seconds=60)


def test_credits_may_be_a_number(assign):
    assert assign(credits=3).status_code == 201
    assert Job.objects.get().credits == Decimal(3)


def test_credits_as_a_fractional_number_are_taken_exactly(assign):
    assert assign(credits=12345678.1234).status_code == 201
    assert Job.objects.get().credits == Decimal("12345678.1234")


def test_a_retried_assignment_returns_the_same_job(assign):
    assert assign().status_code == 201
    again = assign()
    assert again.status_code == 200
    assert again.json()["created"] is False
    assert Job.objects.count() == 1


def test_the_same_job_id_for_another_job_is_a_conflict(assign, alice):
    other = make_island(alice, "other-host-0001")
    assert assign().status_code == 201
    assert assign(credits="9").status_code == 409
    response = assign(island_id=other.pk)
    assert response.status_code == 409
    assert response.json()["error"] == "job_id job-0001 is already recorded, with another body"
    assert Job.objects.get().credits == Decimal("2.5")


@pytest.mark.parametrize("authorization", [None, "Bearer dsp_wrong", "Bearer isl_x"])
def test_recording_a_job_needs_a_dispatcher_key(client, island, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    payload = {
        "job_id": "j-1",
        "island_id": str(island.pk),
        "workload": "w",
        "credits": "1",
        "lease_seconds": 5,
    }
    response = client.post(JOBS, payload, content_type="application/json", headers=headers)
    assert response.status_code == 401
    assert not Job.objects.exists()


def test_an_islands_token_is_not_a_dispatcher_key(client, island, token):
    payload = {
        "job_id": "j-1",
        "island_id": str(island.pk),
        "workload": "w",
        "credits": "1",
        "lease_seconds": 5,
    }
    assert post_json(client, JOBS, payload, token).status_code == 401


def test_a_revoked_dispatcher_key_stops_working(assign):
    DispatcherKey.objects.get().revoke()
    assert assign().status_code == 401


def test_jobs_go_only_to_active_islands(assign, island, alice):
    assert assign(island_id="00000000-0000-4000-8000-000000000000").status_code == 404
    suspended = make_island(alice, "suspended-host-01", suspended_at=T0)
    response = assign(job_id="job-s", island_id=suspended.pk)
    assert response.status_code == 409
    assert response.json() == {
        "success": False,
        "error": "this Island cannot take the job: it is suspended",
        "rule": "suspended",
    }
    island.remove()
    assert assign(job_id="job-r").status_code == 404
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"credits": "-1"}, "invalid credits"),
        ({"credits": "NaN"}, "invalid credits"),
        ({"credits": "Infinity"}, "invalid credits"),
        ({"credits": "1.00001"}, "at most 4 decimal places"),
        ({"credits": "100000000"}, "invalid credits"),
        ({"credits": "two"}, "invalid credits"),
        # Decimal() reads all of these; found by tests/fuzz ("2.5\n" was accepted).
        ({"credits": "2_5"}, "invalid credits"),  # would have been 25
        ({"credits": " 2.5"}, "invalid credits"),
        ({"credits": "2.5\n"}, "invalid credits"),
        ({"credits": "\u0661\u0662"}, "invalid credits"),  # Arabic-Indic 12
        ({"credits": "1e3"}, "invalid credits"),
        ({"credits": True}, "invalid credits"),
        ({"credits": 1e-05}, "at most 4 decimal places"),
        ({"credits": 1e16}, "invalid credits"),
        ({"lease_seconds": 0}, "invalid lease_seconds"),
        ({"lease_seconds": "60"}, "invalid lease_seconds"),
        ({"job_id": "has spaces"}, "invalid job_id"),
        ({"job_id": ""}, "invalid job_id"),
        ({"island_id": "not-a-uuid"}, "invalid island_id"),
        ({"workload": None}, "invalid workload"),
        # PostgreSQL cannot store NUL: this was a 500 there. A workload is a
        # name (it keys the Islands' prices), so any odd character is refused.
        ({"workload": "llm\x00chat"}, "invalid workload: Expected `str` matching regex"),
    ],
)
def test_an_invalid_assignment_gets_400_and_writes_nothing(assign, change, message):
    response = assign(**change)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert not Job.objects.exists()


def test_the_key_command_prints_a_key_once_and_stores_its_hash(db):
    out, err = io.StringIO(), io.StringIO()
    call_command("create_dispatcher_key", "dispatcher eu-1", stdout=out, stderr=err)
    key = out.getvalue().strip()
    assert key.startswith("dsp_")
    row = DispatcherKey.objects.get()
    assert row.name == "dispatcher eu-1"
    assert key not in row.key_hash
    assert DispatcherKey.objects.authenticate(key) == row
    assert "only time it is shown" in err.getvalue()


# --- Islands learn their jobs ---------------------------------------------------------


def test_an_island_polls_for_the_jobs_it_has_not_started(client, island, token, bob):
    with time_machine.travel(T0, tick=False):
        give(island, "job-a")
        give(island, "job-b", credits="1")
        give(island, "job-c")
    Job.objects.apply_status(island, "job-c", "started")
    give(make_island(bob, "bob-host-00000001"), "job-bob")
    response = post_json(client, POLL, {}, token)
    assert response.status_code == 200
    assert response.json() == {
        "success": True,
        "jobs": [
            {
                "job_id": "job-a",
                "workload_id": "llm-chat",
                "input": None,
                "runtime_type": "container",
                "credits": "2.5000",
                "lease_expires": 1772366700000,
            },
            {
                "job_id": "job-b",
                "workload_id": "llm-chat",
                "input": None,
                "runtime_type": "container",
                "credits": "1.0000",
                "lease_expires": 1772366700000,
            },
        ],
        "cancelled": [],
    }


def test_polling_needs_the_islands_token(client, island):
    assert post_json(client, POLL, {}).status_code == 401


# --- Islands report states --------------------------------------------------------------


def test_started_and_streaming_move_the_job_forward(report, island):
    give(island)
    with time_machine.travel(T0, tick=False):
        response = report("job-0001", "started")
    assert response.status_code == 200
    assert response.json() == {"success": True, "applied": True, "state": "started"}
    with time_machine.travel(T0 + timedelta(seconds=3), tick=False):
        assert report("job-0001", "streaming").json()["applied"] is True
    job = Job.objects.get()
    assert job.state == State.STREAMING
    assert job.started_at == T0


def test_streaming_without_started_records_the_start(report, island):
    give(island)
    with time_machine.travel(T0, tick=False):
        report("job-0001", "streaming")
    assert Job.objects.get().started_at == T0


def test_late_or_repeated_active_states_are_ignored(report, island):
    give(island)
    with time_machine.travel(T0, tick=False):
        report("job-0001", "started")
    with time_machine.travel(T0 + timedelta(seconds=5), tick=False):
        assert report("job-0001", "started").json() == {"success": True, "applied": False, "state": "started"}
        report("job-0001", "streaming")
        assert report("job-0001", "started").json()["state"] == "streaming"
    assert Job.objects.get().started_at == T0


def test_succeeded_counts_a_completed_job_and_pays_its_credits(report, island):
    give(island, credits="2.5")
    with time_machine.travel(T0, tick=False):
        assert report("job-0001", "succeeded").json() == {
            "success": True,
            "applied": True,
            "state": "succeeded",
        }
    assert counters(island) == (1, 0, Decimal("2.5"))
    job = Job.objects.get()
    assert job.finished_at == T0
    assert job.started_at is None  # never reported; karma sees an unknown start


def test_failed_counts_a_failed_job_and_keeps_the_error(report, island):
    give(island)
    response = report("job-0001", "failed", error="Out of memory: container exceeded memory limit")
    assert response.status_code == 200
    assert counters(island) == (0, 1, Decimal(0))
    assert Job.objects.get().error == "Out of memory: container exceeded memory limit"


def test_a_long_error_is_kept_in_part(report, island):
    give(island)
    assert report("job-0001", "failed", error="x" * 10_000).status_code == 200
    assert len(Job.objects.get().error) == 2000


def test_an_error_with_nul_characters_is_kept_readable(report, island):
    """Found by tests/fuzz: PostgreSQL refused the NUL and the report was a 500.

    A final state is never refused for its error text (the agent would retry
    it forever), so the NUL is replaced instead.
    """
    give(island)
    assert report("job-0001", "failed", error="bad\x00byte").status_code == 200
    assert Job.objects.get().error == "bad\ufffdbyte"


@pytest.mark.parametrize("job_id", ["%00", "job-0001%0A", "x" * 129, "%C3%A9t%C3%A9"])
def test_a_job_id_that_cannot_exist_is_not_found(report, island, job_id):
    """Found by tests/fuzz: a NUL in the URL reached PostgreSQL and was a 500."""
    give(island)
    response = report(job_id, "succeeded")
    assert response.status_code == 404
    assert response.json() == {"success": False, "error": "no such job for this Island"}
    assert Job.objects.get().state == State.ASSIGNED


def test_cancelled_neither_counts_nor_pays(report, island):
    give(island)
    assert report("job-0001", "cancelled").status_code == 200
    assert counters(island) == (0, 0, Decimal(0))
    assert Job.objects.get().state == State.CANCELLED


@pytest.mark.parametrize("state", ["succeeded", "failed", "cancelled"])
def test_a_repeated_terminal_state_is_accepted_and_ignored(report, island, state):
    give(island)
    before = None
    for _ in range(3):
        response = report("job-0001", state)
        assert response.status_code == 200
        before = before or counters(island)
    assert response.json() == {"success": True, "applied": False, "state": state}
    assert counters(island) == before


def test_a_conflicting_terminal_state_gets_409(report, island):
    give(island)
    report("job-0001", "succeeded")
    response = report("job-0001", "failed", error="too late")
    assert response.status_code == 409
    assert response.json() == {"success": False, "error": "job job-0001 already ended as succeeded"}
    assert counters(island) == (1, 0, Decimal("2.5"))
    assert Job.objects.get().error == ""


def test_an_active_state_after_the_end_is_ignored(report, island):
    give(island)
    report("job-0001", "succeeded")
    assert report("job-0001", "started").json() == {"success": True, "applied": False, "state": "succeeded"}


def test_another_islands_job_is_not_found(report, island, bob):
    give(make_island(bob, "bob-host-00000001"), "job-bob")
    response = report("job-bob", "succeeded")
    assert response.status_code == 404
    assert Job.objects.get().state == State.ASSIGNED
    assert report("no-such-job", "started").status_code == 404


def test_reporting_needs_the_islands_token(report, island):
    give(island)
    assert report("job-0001", "succeeded", token=None).status_code == 401
    assert report("job-0001", "succeeded", token="isl_nope").status_code == 401
    assert Job.objects.get().state == State.ASSIGNED


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"state": "completed"}, "invalid state"),
        ({"state": "timed_out"}, "invalid state"),
        ({"state": "assigned"}, "invalid state"),
        ({"state": None}, "invalid state"),
        ({}, "missing required field `state`"),
        ({"state": "failed", "error": 42}, "invalid error"),
        ({"state": "started", "timestamp": "now"}, "invalid timestamp"),
        ({"state": "started", "job_id": "job-0002"}, "invalid job_id"),
    ],
)
def test_an_invalid_report_gets_400_and_writes_nothing(client, token, island, body, message):
    give(island)
    response = post_json(client, status_url("job-0001"), body, token)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert Job.objects.get().state == State.ASSIGNED


def test_the_body_may_name_the_same_job_and_unknown_fields_are_ignored(client, token, island):
    give(island)
    body = {"job_id": "job-0001", "state": "started", "progress": 0.5}
    assert post_json(client, status_url("job-0001"), body, token).status_code == 200


# --- Leases -----------------------------------------------------------------------------


def test_a_job_whose_lease_passes_is_failed_as_a_timeout(island):
    """Timed out on its Island; with no other Island to take it, it waits a lease, then fails."""
    give(island, lease=timedelta(seconds=60), now=T0)
    assert Watcher().handle_one(T0 + timedelta(seconds=59.9)).timeouts == 0
    assert Watcher().handle_one(T0 + timedelta(seconds=60.1)).timeouts == 1
    job = Job.objects.get()
    assert (job.state, job.island) == (State.QUEUED, None)
    assert job.attempts.get().outcome == "timed_out"
    assert job.attempts.get().finished_at == T0 + timedelta(seconds=60)
    assert counters(island) == (0, 1, Decimal(0))
    step = Watcher().handle_one(T0 + timedelta(minutes=5))
    assert (step.timeouts, step.requeued) == (0, 1)
    job.refresh_from_db()
    assert job.state == State.TIMED_OUT
    assert job.finished_at == T0 + timedelta(seconds=120.1)
    assert counters(island) == (0, 1, Decimal(0))


def test_a_report_after_the_timeout_is_a_conflict(report, island):
    give(island, lease=timedelta(seconds=60), now=T0)
    Watcher().handle_one(T0 + timedelta(minutes=2))
    assert report("job-0001", "succeeded").status_code == 409
    assert counters(island) == (0, 1, Decimal(0))


def test_finished_jobs_never_time_out(report, island):
    give(island, lease=timedelta(seconds=60), now=T0)
    report("job-0001", "succeeded")
    assert Watcher().handle_one(T0 + timedelta(hours=1)).timeouts == 0
    assert Job.objects.get().state == State.SUCCEEDED


# --- The invariant: counters are what the ledger says ------------------------------------------


def ledger_totals(island):
    return Attempt.objects.filter(island=island).aggregate(
        completed=Count("pk", filter=Q(outcome="succeeded")),
        failed=Count("pk", filter=Q(outcome__in=["failed", "timed_out"])),
        earned=Sum("credits", filter=Q(outcome="succeeded"), default=Decimal(0)),
    )


def assert_counters_match_the_ledger():
    for island in Island.objects.all():
        totals = ledger_totals(island)
        running = Job.objects.filter(island=island, state__in=Job.ACTIVE_STATES).count()
        assert (island.jobs_completed, island.jobs_failed, island.earnings, island.jobs_running) == (
            totals["completed"],
            totals["failed"],
            totals["earned"],
            running,
        ), island.host_id


@pytest.mark.parametrize("seed", range(3))
def test_counters_equal_the_ledger_after_a_random_mix_of_reports(alice, seed):
    rng = random.Random(seed)
    islands = [make_island(alice, f"host-{n:08d}") for n in range(3)]
    jobs = []
    for n in range(60):
        island = rng.choice(islands)
        lease = timedelta(seconds=rng.randint(10, 300))
        credits = Decimal(rng.randint(0, 100_000)) / 10_000
        jobs.append(give(island, f"job-{n:04d}", credits=str(credits), lease=lease, now=T0))
    states = ["started", "streaming", "succeeded", "failed", "cancelled"]
    for minute in range(1, 400):
        job = rng.choice(jobs)
        # The same report twice now and then, as JetStream redelivers.
        for _ in range(rng.choice([1, 1, 2, 3])):
            with contextlib.suppress(JobStateConflict, JobMoved):
                Job.objects.apply_status(
                    job.island, job.job_id, rng.choice(states), now=T0 + timedelta(seconds=minute)
                )
        if minute % 50 == 0:
            Watcher().handle_one(T0 + timedelta(seconds=minute))
    Watcher().handle_one(T0 + timedelta(hours=1))
    assert not Job.objects.filter(state__in=Job.ACTIVE_STATES).exists()
    assert_counters_match_the_ledger()
    assert Island.objects.aggregate(total=Sum("jobs_completed"))["total"] > 0


@pytest.mark.django_db(transaction=True)
def test_racing_reports_of_one_job_count_it_once(postgres, alice):
    island = make_island(alice)
    jobs = [give(island, f"job-{n:04d}", credits="1.5") for n in range(20)]
    barrier = threading.Barrier(8)
    errors = []

    def reporter(state):
        try:
            barrier.wait()
            for job in jobs:
                with contextlib.suppress(JobStateConflict, JobMoved):
                    Job.objects.apply_status(island, job.job_id, state)
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    states = ["succeeded", "succeeded", "failed", "failed", "succeeded", "cancelled", "succeeded", "failed"]
    threads = [threading.Thread(target=reporter, args=(state,)) for state in states]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert not Job.objects.filter(state__in=Job.ACTIVE_STATES).exists()
    assert_counters_match_the_ledger()
    island.refresh_from_db()
    assert (
        island.jobs_completed + island.jobs_failed + Job.objects.filter(state=State.CANCELLED).count() == 20
    )


def test_a_job_id_with_a_trailing_newline_is_refused(assign):
    response = assign(job_id="job-0001\n")
    assert response.status_code == 400
    assert response.json()["error"].startswith("invalid job_id")
    assert not Job.objects.exists()
