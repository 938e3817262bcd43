"""`watch_islands` SIGKILLed mid-batch and restarted: every change is recorded exactly once.

What makes it so, per change:

- a silence is a compare-and-set UPDATE of the Island (online, with the very
  deadline that passed) and the INSERT of its StatusChange, in one
  transaction: a kill before the COMMIT leaves the Island online, and the
  next watcher records it; after it, the Island is offline and no watcher
  records it again;
- a timed-out attempt is the same compare-and-set on the job, with its
  Island's counter and its karma event in that transaction, which also
  leaves the job waiting (QUEUED) for another Island;
- placing it again is a compare-and-set on the waiting job and the one
  Island's slot and turn, with the new attempt, in one transaction;
- a karma event is an INSERT under a unique constraint per cause (job;
  silence and step) and the UPDATE of the score, in one transaction.

A SIGKILL runs no handler and flushes nothing; PostgreSQL rolls back the
transaction the process had open. The test kills the watcher twice, once
while it records silences and once while it charges karma, checks at each
kill that nothing is half-applied, restarts it, and checks that in the end
each change exists once.
"""

from collections import Counter
from datetime import timedelta
from decimal import Decimal

from django.db.models import Count, Q, Sum
from django.utils import timezone

from islands.models import Attempt, Island, Job, StatusChange
from karma.models import KarmaEvent
from tests.faults.conftest import silent_islands, wait_for
from tests.islands.conftest import give_job

# Big enough that a batch takes a while on PostgreSQL (each change is a
# transaction of its own), so the kills land in the middle of one: the
# watcher takes 500 Islands a step.
ISLANDS = 1200
JOBS = 200
# Online throughout, with room for every job: the timed-out jobs go to them.
SPARE = 5
START = Decimal(50)
Cause = KarmaEvent.Cause


def silences() -> int:
    return StatusChange.objects.filter(reason=StatusChange.Reason.SILENCE).count()


def charges() -> int:
    return KarmaEvent.objects.filter(cause=Cause.DISCONNECTION).count()


def assert_nothing_half_applied() -> None:
    """What a kill at any point may leave: changes recorded whole, or not at all."""
    silent = Counter(
        StatusChange.objects.filter(reason=StatusChange.Reason.SILENCE).values_list("island_id", flat=True)
    )
    assert max(silent.values(), default=0) <= 1, "a silence recorded twice"
    offline = set(Island.objects.filter(status=Island.Status.OFFLINE).values_list("pk", flat=True))
    assert offline == set(silent), "an Island offline without its silence, or the other way round"

    timed_out = Attempt.objects.filter(outcome=Attempt.Outcome.TIMED_OUT)
    job_events = Counter(KarmaEvent.objects.filter(cause=Cause.JOB).values_list("attempt_id", flat=True))
    assert job_events == Counter(timed_out.values_list("pk", flat=True)), "a timeout without its karma"
    failed = dict(timed_out.values("island").annotate(n=Count("pk")).values_list("island", "n"))
    counted = dict(Island.objects.filter(jobs_failed__gt=0).values_list("pk", "jobs_failed"))
    assert counted == failed, "a timeout without its count on the Island"
    # A job is waiting, or has exactly one attempt running; each slot taken is counted.
    for job in Job.objects.annotate(running=Count("attempts", filter=Q(attempts__outcome=""))):
        assert job.running == (0 if job.state == Job.State.QUEUED else 1), job.job_id
        assert job.attempts.count() == job.attempt, job.job_id
    running = dict(
        Attempt.objects.filter(outcome="").values("island").annotate(n=Count("pk")).values_list("island", "n")
    )
    assert dict(Island.objects.filter(jobs_running__gt=0).values_list("pk", "jobs_running")) == running

    steps = Counter(
        KarmaEvent.objects.filter(cause=Cause.DISCONNECTION).values_list("status_change_id", "step")
    )
    assert max(steps.values(), default=0) <= 1, "a disconnection step charged twice"
    # Every score is the sum of its events: no event without its score, nor the reverse.
    totals = Island.objects.annotate(total=Sum("karma_events__delta")).values_list("karma", "total")
    assert all(karma == START + (total or 0) for karma, total in totals), "a score out of step"


def test_the_watcher_killed_mid_batch_and_restarted_records_each_change_once(spawn, alice):
    # Silent for 20 minutes: each Island is due its silence and the first
    # disconnection step (due after 15 minutes), and no second one.
    islands = silent_islands(alice, ISLANDS, silent_for=timedelta(minutes=20))
    now = timezone.now()
    for n in range(JOBS):
        give_job(
            island=islands[n],
            job_id=f"killed-watcher-{n:04d}",
            lease=timedelta(minutes=9),
            now=now - timedelta(minutes=10),
        )
    spare = silent_islands(alice, SPARE, silent_for=-timedelta(hours=1))  # online for another hour
    Island.objects.filter(pk__in=[island.pk for island in spare]).update(capacity=JOBS)

    def watcher():
        return spawn.command("watcher", "watch_islands", "--interval", "0.2")

    # Killed while it records silences.
    first = watcher()
    wait_for(lambda: 0 < silences() < ISLANDS, what="the watcher to be recording silences")
    first.kill()
    assert 0 < silences() < ISLANDS
    assert_nothing_half_applied()

    # Killed again while it charges disconnections.
    charged_before = charges()
    second = watcher()
    wait_for(lambda: charged_before < charges() < ISLANDS, what="the watcher to be charging karma")
    second.kill()
    assert charged_before < charges() < ISLANDS
    assert_nothing_half_applied()

    # The third runs to the end, and stops when asked.
    third = watcher()
    wait_for(lambda: silences() == ISLANDS and charges() == ISLANDS, what="every change to be recorded")
    wait_for(lambda: Attempt.objects.filter(number=2).count() == JOBS, what="every job to time out and move")
    assert third.stop() == 0
    assert_nothing_half_applied()

    # Each change exactly once: one silence and one disconnection step per
    # Island, one timeout and its karma per job, one second attempt per job.
    assert Island.objects.filter(status=Island.Status.OFFLINE).count() == ISLANDS
    assert silences() == ISLANDS
    assert StatusChange.objects.count() == ISLANDS
    assert set(
        KarmaEvent.objects.filter(cause=Cause.DISCONNECTION).values_list("step", "delta").distinct()
    ) == {(1, Decimal(-1))}
    assert KarmaEvent.objects.filter(cause=Cause.JOB).count() == JOBS
    assert Attempt.objects.filter(outcome=Attempt.Outcome.TIMED_OUT).count() == JOBS
    assert Job.objects.filter(state=Job.State.ASSIGNED, attempt=2, island__in=spare).count() == JOBS
    assert KarmaEvent.objects.count() == ISLANDS + JOBS
    silent = Island.objects.exclude(pk__in=[island.pk for island in spare])
    assert dict(Counter(silent.values_list("karma", "jobs_failed", "jobs_running"))) == {
        (Decimal(45), 1, 0): JOBS,  # 50, −4 for the timed-out job, −1 for the disconnection
        (Decimal(49), 0, 0): ISLANDS - JOBS,
    }
    assert (
        sum(Island.objects.filter(pk__in=[i.pk for i in spare]).values_list("jobs_running", flat=True))
        == JOBS
    )
