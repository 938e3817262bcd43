"""A lease that runs out moves the job: to another Island, up to three attempts, once each."""

import threading
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection

from archipelag.management.commands.watch_islands import Command as Watcher
from islands.models import Attempt, Island, Job, JobMoved, JobSpec, OutboxMessage
from karma.models import KarmaEvent
from tests.islands.conftest import T0, beat, make_island

LEASE = timedelta(minutes=5)
ROOM: dict[str, Any] = {"performance_estimates": {"max_concurrent_containers": 8}}


def online(island: Island, at=T0) -> Island:
    beat(island, at, **ROOM)
    return island


def keep_online(*islands: Island, until=T0 + timedelta(hours=2)) -> None:
    """Their heartbeats carry them to `until` (as beats every 10 s would)."""
    Island.objects.filter(pk__in=[island.pk for island in islands]).update(
        status=Island.Status.ONLINE, offline_after=until
    )


def submit(job_id: str = "job-1", at=T0, **fields) -> Job:
    spec = JobSpec(job_id=job_id, workload="llm-chat", lease=LEASE, budget=Decimal(5), **fields)
    return Job.objects.submit(spec, now=at)


def step(at) -> None:
    Watcher().handle_one(at)


def test_a_timed_out_job_goes_to_another_island_and_the_first_is_charged(alice, bob):
    first = online(make_island(alice, "first-host-001"))
    job = submit()
    assert job.island == first
    second = online(make_island(bob, "second-host-01"))
    keep_online(first, second)
    step(T0 + LEASE + timedelta(seconds=1))
    job.refresh_from_db()
    assert (job.island, job.attempt, job.state) == (second, 2, "assigned")
    assert job.assigned_at == T0 + LEASE + timedelta(seconds=1)
    assert job.lease_expires_at == job.assigned_at + LEASE
    attempts = list(job.attempts.order_by("number").values_list("island", "outcome"))
    assert attempts == [(first.pk, "timed_out"), (second.pk, "")]
    first.refresh_from_db()
    assert (first.jobs_failed, first.jobs_running, first.karma) == (1, 0, Decimal(46))
    # The second succeeds: it is paid and rewarded; the first hears its late report refused.
    Job.objects.apply_status(second, "job-1", "started", now=job.assigned_at + timedelta(seconds=2))
    Job.objects.apply_status(second, "job-1", "succeeded", now=job.assigned_at + timedelta(seconds=30))
    with pytest.raises(JobMoved):
        Job.objects.apply_status(first, "job-1", "succeeded", now=job.assigned_at + timedelta(seconds=31))
    second.refresh_from_db()
    assert (second.jobs_completed, second.earnings, second.jobs_running, second.karma) == (
        1,
        Decimal(1),
        0,
        Decimal(51),
    )
    assert list(KarmaEvent.objects.order_by("id").values_list("island", "delta")) == [
        (first.pk, Decimal(-4)),
        (second.pk, Decimal(1)),
    ]


@pytest.mark.parametrize("published", [False, True], ids=["never-published", "published"])
def test_a_nats_island_is_charged_for_a_timeout_only_if_its_assignjob_was_published(alice, published):
    """NATS down (or the sender given up) for a whole lease: the Island never had the job."""
    nats = online(make_island(alice, "nats-host-0001", transport=Island.Transport.NATS))
    job = submit()
    attempt = Attempt.objects.get(job=job)
    assert attempt.assign_message is not None
    if published:
        OutboxMessage.objects.filter(pk=attempt.assign_message.pk).update(sent_at=T0, stream_seq=7)
    keep_online(nats)
    step(T0 + LEASE + timedelta(seconds=1))
    attempt.refresh_from_db()
    nats.refresh_from_db()
    if published:
        assert attempt.outcome == "timed_out"
        assert (nats.jobs_failed, nats.karma) == (1, Decimal(46))
        assert KarmaEvent.objects.filter(island=nats).count() == 1
    else:
        assert attempt.outcome == "undelivered"
        assert (nats.jobs_failed, nats.karma) == (0, Decimal(50))
        assert not KarmaEvent.objects.filter(island=nats).exists()
    job.refresh_from_db()
    if published:
        # Never again on an Island that timed out on it: it waits for another.
        assert (job.attempt, job.state, nats.jobs_running) == (1, "queued", 0)
    else:
        # Not its fault, so it may take the job again.
        assert (job.attempt, job.state, nats.jobs_running) == (2, "assigned", 1)


def test_never_again_on_an_island_that_timed_out_on_it_and_three_attempts_at_most(alice):
    islands = [online(make_island(alice, f"host-{n:010d}")) for n in range(4)]
    job = submit()
    keep_online(*islands)
    at = T0
    for attempt in (1, 2, 3):
        job.refresh_from_db()
        assert job.attempt == attempt
        at = job.lease_expires_at + timedelta(seconds=1)
        step(at)
    job.refresh_from_db()
    assert job.state == "timed_out"
    used = list(job.attempts.values_list("island", flat=True))
    assert len(used) == len(set(used)) == 3  # three different Islands
    assert Attempt.objects.filter(outcome="timed_out").count() == 3
    assert sorted(Island.objects.values_list("jobs_failed", flat=True)) == [0, 1, 1, 1]
    assert not Island.objects.filter(jobs_running__gt=0).exists()


def test_with_no_island_eligible_it_waits_a_lease_then_fails(alice):
    only = online(make_island(alice))
    job = submit()
    keep_online(only)
    timed_out_at = T0 + LEASE + timedelta(seconds=1)
    step(timed_out_at)
    job.refresh_from_db()
    # The only Island timed out on it, so it may not have it back: the job waits.
    assert (job.state, job.island, job.requeue_until) == ("queued", None, timed_out_at + LEASE)
    step(timed_out_at + LEASE - timedelta(seconds=1))
    job.refresh_from_db()
    assert job.state == "queued"
    step(timed_out_at + LEASE + timedelta(seconds=1))
    job.refresh_from_db()
    assert (job.state, job.finished_at) == ("timed_out", timed_out_at + LEASE)
    assert job.error == "no eligible Island took it within a lease of its last timeout"


def test_a_waiting_job_is_placed_as_soon_as_an_island_may_take_it(alice, bob):
    first = online(make_island(alice))
    submit()
    keep_online(first)
    step(T0 + LEASE + timedelta(seconds=1))
    newcomer = make_island(bob, "newcomer-host-1")
    keep_online(newcomer)
    step(T0 + LEASE + timedelta(minutes=2))
    job = Job.objects.get()
    assert (job.state, job.island, job.attempt) == ("assigned", newcomer, 2)


# --- Two watchers at once, on PostgreSQL --------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_two_watchers_time_out_and_place_each_job_once(postgres, alice):
    first = [online(make_island(alice, f"first-{n:04d}")) for n in range(4)]
    jobs = [submit(f"job-{n:04d}") for n in range(24)]
    spare = [make_island(alice, f"spare-{n:04d}") for n in range(3)]
    keep_online(*first, *spare)
    Island.objects.filter(pk__in=[island.pk for island in first]).update(capacity=8)
    Island.objects.filter(pk__in=[island.pk for island in spare]).update(capacity=8)
    at = T0 + LEASE + timedelta(seconds=1)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            barrier.wait()
            step(at)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=watch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert Attempt.objects.filter(outcome="timed_out").count() == len(jobs)
    assert KarmaEvent.objects.filter(cause="job").count() == len(jobs)
    assert Attempt.objects.filter(number=2).count() == len(jobs)
    assert Attempt.objects.count() == 2 * len(jobs)
    for job in Job.objects.all():
        assert (job.attempt, job.state) == (2, "assigned")
        assert job.island_id in {island.pk for island in first + spare}
        assert not job.attempts.filter(number=1, island=job.island).exists()
    for island in Island.objects.all():
        assert island.jobs_running == Attempt.objects.filter(island=island, outcome="").count() <= 8
        assert island.jobs_failed == Attempt.objects.filter(island=island, outcome="timed_out").count()
