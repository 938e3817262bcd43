"""The job rule: a job's terminal state moves its Island's karma once, in the same transaction."""

from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine

from islands.models import DispatcherKey, Job, JobMoved, JobStateConflict
from karma import rules
from karma.models import KarmaEvent
from tests.islands.conftest import post_json
from tests.karma.conftest import T0, assert_ledger_adds_up, beat, events, give, karma, run_job, watch


@pytest.mark.parametrize(
    ("start_after", "raise_by"),
    [
        (timedelta(0), "1.00"),
        (timedelta(seconds=15), "1.00"),  # QUICK_START: still quick
        (timedelta(seconds=16), "0.50"),
        (timedelta(seconds=60), "0.50"),  # SLOW_START: not slow yet
        (timedelta(seconds=61), "0.25"),
        (None, "0.25"),  # never said it started: counts as slow
    ],
)
def test_a_succeeded_job_raises_karma_less_when_the_island_was_slow_to_start(island, start_after, raise_by):
    job = run_job(island, "job-1", T0, "succeeded", start_after)
    assert karma(island) == Decimal(50) + Decimal(raise_by)
    [event] = events(island)
    assert (event.cause, event.job, event.delta, event.score_after) == (
        KarmaEvent.Cause.JOB,
        job,
        Decimal(raise_by),
        Decimal(50) + Decimal(raise_by),
    )
    assert event.effective_at == job.finished_at


def test_the_reason_says_how_quickly_the_job_started(island):
    run_job(island, "quick", T0, "succeeded", timedelta(seconds=3))
    run_job(island, "slow", T0, "succeeded", timedelta(minutes=2, seconds=5))
    run_job(island, "silent", T0, "succeeded", None)
    assert [event.reason for event in events(island)] == [
        "Job quick succeeded; started 3 s after assignment",
        "Job slow succeeded, but started slowly: 2 min 5 s after assignment",
        "Job silent succeeded, but never reported its start",
    ]


def test_a_failed_job_lowers_karma(island):
    run_job(island, "job-1", T0, "failed", timedelta(seconds=2))
    assert karma(island) == Decimal(48)
    assert [(event.delta, event.reason) for event in events(island)] == [(Decimal(-2), "Job job-1 failed")]


def test_a_timed_out_job_lowers_karma_more_dated_at_its_lease_deadline(island):
    give(island, "job-1", T0, lease=timedelta(minutes=5))
    watch(T0 + timedelta(minutes=4, seconds=59))
    assert events(island) == []
    # The watcher runs late: the event is still dated when the lease ran out.
    watch(T0 + timedelta(hours=3))
    assert karma(island) == Decimal(46)
    [event] = events(island)
    assert event.delta == Decimal(-4)
    assert event.effective_at == T0 + timedelta(minutes=5)
    assert event.reason == "Job job-1 timed out: no final state before its lease expired"


def test_a_timeout_costs_more_than_a_failure(island):
    assert rules.JOB_TIMED_OUT < rules.JOB_FAILED < 0 < rules.JOB_SUCCEEDED_SLOW


def test_a_cancelled_job_changes_nothing(island):
    run_job(island, "job-1", T0, "cancelled", timedelta(seconds=2))
    assert karma(island) == Decimal(50)
    assert events(island) == []


def test_a_redelivered_status_counts_once(island):
    give(island, "job-1", T0)
    for _ in range(3):
        Job.objects.apply_status(island, "job-1", "succeeded", now=T0 + timedelta(seconds=30))
    with pytest.raises(JobStateConflict):
        Job.objects.apply_status(island, "job-1", "failed", now=T0 + timedelta(seconds=40))
    assert karma(island) == Decimal("50.25")
    assert len(events(island)) == 1


def test_a_report_after_the_lease_sweep_changes_nothing_more(island):
    give(island, "job-1", T0, lease=timedelta(minutes=5))
    watch(T0 + timedelta(minutes=6))
    # The job moved on (to wait for another Island): the late report is refused.
    with pytest.raises(JobMoved):
        Job.objects.apply_status(island, "job-1", "succeeded", now=T0 + timedelta(minutes=6))
    assert [event.delta for event in events(island)] == [Decimal(-4)]


def test_the_job_and_its_karma_commit_together(island, monkeypatch):
    give(island, "job-1", T0)

    def broken(*args, **kwargs):
        raise RuntimeError("karma rule failed")

    monkeypatch.setattr(rules, "for_job", broken)
    with pytest.raises(RuntimeError):
        Job.objects.apply_status(island, "job-1", "succeeded", now=T0 + timedelta(seconds=30))
    job = Job.objects.get(job_id="job-1")
    assert job.state == Job.State.ASSIGNED
    island.refresh_from_db()
    assert (island.jobs_completed, island.karma) == (0, Decimal(50))


def test_over_http_the_islands_report_moves_its_karma(island, client):
    token = island.issue_token()
    _, key = DispatcherKey.objects.issue("test dispatcher")
    beat(island, T0)  # the explicit form places only on an eligible Island
    with time_machine.travel(T0, tick=False):
        post_json(
            client,
            "/api/v1/jobs",
            {
                "job_id": "job-1",
                "island_id": str(island.pk),
                "workload": "w",
                "credits": "1",
                "lease_seconds": 60,
            },
            key,
        )
    url = "/api/v1/islands/jobs/job-1/status"
    with time_machine.travel(T0 + timedelta(seconds=5), tick=False):
        post_json(client, url, {"state": "started"}, token)
    with time_machine.travel(T0 + timedelta(seconds=30), tick=False):
        assert post_json(client, url, {"state": "succeeded"}, token).json()["applied"] is True
        assert post_json(client, url, {"state": "succeeded"}, token).json()["applied"] is False
    assert karma(island) == Decimal(51)
    [event] = events(island)
    assert event.reason == "Job job-1 succeeded; started 5 s after assignment"
    assert event.effective_at == T0 + timedelta(seconds=30)
    assert_ledger_adds_up(island)
