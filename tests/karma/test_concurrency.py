"""Idempotency under real concurrency, on PostgreSQL: no cause is ever applied twice."""

import contextlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from islands.models import Island, Job, JobStateConflict
from karma.models import KarmaEvent, UptimeSweep
from tests.conftest import race
from tests.karma.conftest import (
    T0,
    assert_ledger_adds_up,
    beat,
    beat_through,
    give,
    make_island,
    watch,
)

pytestmark = pytest.mark.django_db(transaction=True)
Cause = KarmaEvent.Cause


def test_watchers_at_once_charge_each_disconnection_step_once(postgres, alice):
    islands = [make_island(alice, f"host-{n:08d}") for n in range(20)]
    beat(islands, T0)
    silent_at = T0 + timedelta(seconds=45)

    race([lambda: watch(silent_at + timedelta(minutes=50)) for _ in range(6)])
    for island in islands:
        assert island.karma_events.count() == 3  # due at 15, 30 and 45 min
        assert_ledger_adds_up(island)

    race([lambda: watch(silent_at + timedelta(hours=5)) for _ in range(6)])
    for island in islands:
        assert list(island.karma_events.order_by("step").values_list("step", flat=True)) == list(range(1, 11))
        assert_ledger_adds_up(island)
    assert Island.objects.filter(karma=Decimal(40)).count() == 20


def test_watchers_at_once_reward_each_day_once(postgres, alice, settings):
    settings.ISLAND_OFFLINE_AFTER = 2 * 3600
    midnight = datetime(2026, 3, 2, tzinfo=UTC)
    islands = [make_island(alice, f"host-{n:08d}") for n in range(20)]
    for island in islands:
        beat_through(
            island, midnight - timedelta(hours=1), midnight + timedelta(hours=25), timedelta(hours=1)
        )

    race([lambda: watch(midnight + timedelta(days=1, minutes=5)) for _ in range(6)])

    assert KarmaEvent.objects.filter(cause=Cause.UPTIME).count() == 20
    assert Island.objects.filter(karma=Decimal(51)).count() == 20
    assert UptimeSweep.objects.filter(day=midnight.date()).count() == 1


def test_racing_reports_of_each_job_move_karma_once(postgres, alice):
    island = make_island(alice)
    jobs = [give(island, f"job-{n:04d}", T0) for n in range(20)]

    def reporter(state):
        def report():
            for job in jobs:
                with contextlib.suppress(JobStateConflict):
                    Job.objects.apply_status(island, job.job_id, state, now=T0 + timedelta(seconds=30))

        return report

    states = ["succeeded", "succeeded", "failed", "failed", "succeeded", "cancelled", "succeeded", "failed"]
    race([reporter(state) for state in states])

    ended = Job.objects.exclude(state=Job.State.CANCELLED)
    assert set(KarmaEvent.objects.values_list("job__job_id", flat=True)) == {job.job_id for job in ended}
    assert KarmaEvent.objects.count() == ended.count()
    assert_ledger_adds_up(island)


def test_jobs_watchers_and_admins_on_one_island_never_deadlock_or_lose_a_change(postgres, alice):
    """The Island's row lock orders every change; the ledger still adds up."""
    island = make_island(alice)
    beat(island, T0)
    # Their leases outlive the watchers' hour, so a watcher that runs before
    # the reporters (as on a loaded machine) does not take them back.
    jobs = [give(island, f"job-{n:04d}", T0, lease=timedelta(hours=2)) for n in range(30)]
    leases = [give(island, f"lease-{n:04d}", T0, lease=timedelta(seconds=10)) for n in range(10)]

    def report():
        for job in jobs:
            with contextlib.suppress(JobStateConflict):
                Job.objects.apply_status(island, job.job_id, "succeeded", now=T0 + timedelta(minutes=1))

    def adjust():
        for n in range(10):
            KarmaEvent.objects.adjust(island, Decimal("0.5"), f"adjustment {n}", by=None)

    later = T0 + timedelta(hours=1)
    race([report, report, adjust, lambda: watch(later), lambda: watch(later), lambda: watch(later)])

    counts = dict(
        (cause, KarmaEvent.objects.filter(cause=cause).count())
        for cause in (Cause.JOB, Cause.ADMIN, Cause.DISCONNECTION)
    )
    assert counts == {Cause.JOB: len(jobs) + len(leases), Cause.ADMIN: 10, Cause.DISCONNECTION: 3}
    assert_ledger_adds_up(island)
