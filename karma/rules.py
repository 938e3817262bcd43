"""Every number karma uses, and the pure functions that apply them.

This module is the single source of truth: the rules in karma/models.py call
the functions here, and /reference/karma is rendered from the constants here
at request time, so the published rules and the applied ones cannot drift.
Nothing here touches the database.

Karma is a score from MINIMUM to MAXIMUM with two decimal places. Each change
is a KarmaEvent; the score is their running sum, clamped to the range.
"""

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_FLOOR, Decimal

# --- The score ---------------------------------------------------------------------

# New Islands start here; the public site says "starts at 50, maxes at 100".
START = Decimal(50)
MINIMUM = Decimal(0)
MAXIMUM = Decimal(100)
# Scores and deltas carry two decimal places.
PLACES = Decimal("0.01")

# --- Jobs --------------------------------------------------------------------------
# One event per job, when it reaches a terminal state (Job.objects.apply_status
# or the watcher's lease sweep), dated at the job's finished_at.

# Response latency is started_at − assigned_at: how long the Island took to
# say it started after the dispatcher gave it the job. Islands polling over
# HTTP see new jobs after their next heartbeat (every 10 s), so a start within
# QUICK_START is as quick as that path allows; NATS Islands start in well
# under a second.
QUICK_START = timedelta(seconds=15)
SLOW_START = timedelta(seconds=60)
# A succeeded job that started within QUICK_START.
JOB_SUCCEEDED_QUICK = Decimal("1.00")
# A succeeded job that started within SLOW_START.
JOB_SUCCEEDED = Decimal("0.50")
# A succeeded job that started later than SLOW_START, or whose Island never
# reported `started` or `streaming` (latency unknown): the work was done, but
# the dispatcher could not see it start, so it counts as slow.
JOB_SUCCEEDED_SLOW = Decimal("0.25")
# The Island reported the job failed.
JOB_FAILED = Decimal("-2.00")
# The lease expired before the Island reported a final state: the consumer
# waited for nothing, which is worse than an honest failure.
JOB_TIMED_OUT = Decimal("-4.00")
# A cancelled job changes nothing and records no event: cancelling is the
# consumer's or the coordinator's decision (`host.{id}.cancel`), not the
# Island's doing, and it neither counts nor pays (for_job returns None).
# Nor does a lease that ran out on a job whose AssignJob never reached NATS
# (the outcome "undelivered"): the Island never had it.

# --- Disconnections -----------------------------------------------------------------
# An incident is a `silence` StatusChange (the Island stopped sending
# heartbeats; it is dated at the deadline, ISLAND_OFFLINE_AFTER seconds after
# the last one) until the Island's next status change: back online, or a
# sign-off sent on its way back. Removing the Island also ends it. A graceful
# sign-off is not an incident at all, so it and the offline time after it
# cost nothing.
#
# Step n (n = 1, 2, ...) is due at silence + GRACE + (n − 1) × STEP and is
# charged if the incident still lasts then (strictly: it ends after that
# moment). The watcher charges steps while the incident lasts, each dated at
# its due time, so lateness of the watcher changes nothing.
DISCONNECTION_GRACE = timedelta(minutes=15)
DISCONNECTION_STEP = timedelta(minutes=15)
DISCONNECTION_STEP_PENALTY = Decimal("-1.00")
# The cap per incident: at most this many steps (DISCONNECTION_MAX_STEPS ×
# DISCONNECTION_STEP_PENALTY in all). An Island gone for days is not punished
# without end; it simply gets no jobs while away.
DISCONNECTION_MAX_STEPS = 10

# --- Uptime ------------------------------------------------------------------------
# A full day online: a UTC calendar day [00:00, 24:00) during which the Island
# was online throughout, by its recorded status changes:
#   * its last status change at or before 00:00 took it online, and
#   * no status change (silence, sign-off, ...) is dated after 00:00 up to and
#     including 24:00, and
#   * its heartbeats carried it past 24:00 (its current deadline is after
#     24:00, or a later status change shows it was still online then).
# Any silence, however short, or any sign-off during the day forfeits the bonus
# (a sign-off costs nothing, but it is not uptime).
UPTIME_DAY_BONUS = Decimal("1.00")
# A day is judged this long after it ends, so heartbeats in flight at
# midnight are in before the verdict.
UPTIME_SETTLE = timedelta(minutes=1)
# A watcher that was stopped catches up on at most this many ended days.
UPTIME_LOOKBACK_DAYS = 7

# --- Levels -------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    name: str
    threshold: Decimal
    meaning: str


# Ascending thresholds; an Island is at the highest level whose threshold
# its score reaches. New Islands start at Harbor, START − 40 = 10 points
# above its lower edge: a first failure (−2) or even a timed-out job (−4)
# leaves a new Island in Harbor. (Harbor began at 50 until 2026-12, so the
# first failure of every new Island demoted it to Anchored.) Levels are
# derived from the score when shown, so moving a threshold reclassifies
# existing Islands at once and records nothing.
LEVELS = (
    Level("Adrift", Decimal(0), "Gets no jobs until its karma reaches the placement floor."),
    Level("Anchored", Decimal(25), "Gets jobs, but rarely: every point of karma counts."),
    Level("Harbor", Decimal(40), "Where every new Island starts."),
    Level("Lighthouse", Decimal(70), "Reliable: a steady share of jobs."),
    Level("Flagship", Decimal(90), "The most reliable Islands: the largest share of jobs."),
)

# --- Placement ----------------------------------------------------------------------
# Among the online Islands able to run a job, each is picked with probability
# weight / (sum of weights), where weight = karma ** PLACEMENT_EXPONENT for
# karma ≥ PLACEMENT_FLOOR and 0 below it. With exponent 2, an Island at 100
# gets four times the jobs of one at 50.
PLACEMENT_FLOOR = Decimal(25)
PLACEMENT_EXPONENT = 2

# --- Probation ----------------------------------------------------------------------
# A new host id costs an Island's software nothing, so a fresh Island must
# never be worth more in the draw than a record it could replace. As Storj
# vets new storage nodes before trusting them with much data, a new Island is
# on probation until it has completed PROBATION_JOBS jobs (succeeded ones;
# its `jobs_completed`): until then it is drawn as if its karma were at most
# PROBATION_KARMA, the floor, the least any Island that gets jobs weighs. So
# a new Island at 50 gets a quarter of the jobs of a proven one at 50, and
# from its tenth success on, the weight of its own karma. Karma itself is
# untouched (a new Island shows 50, Harbor); probation is the draw's alone.
# An Island paired again to the account that removed it keeps its count.
PROBATION_JOBS = 10
PROBATION_KARMA = PLACEMENT_FLOOR


# --- The functions --------------------------------------------------------------------


def clamp(score: Decimal) -> Decimal:
    """The score kept within MINIMUM..MAXIMUM, at two decimal places."""
    return min(MAXIMUM, max(MINIMUM, score)).quantize(PLACES)


def describe_duration(span: timedelta) -> str:
    """3 s, 2 min 5 s, 1 h 15 min, 2 h 30 min 1 s: a duration for reasons people read."""
    seconds = max(0, int(span.total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{hours} h"] if hours else []
    if minutes:
        parts.append(f"{minutes} min")
    if seconds:
        parts.append(f"{seconds} s")
    return " ".join(parts) or "0 s"


@dataclass(frozen=True)
class Change:
    """What a rule asks for: a delta to the score and the reason people are shown."""

    delta: Decimal
    reason: str


def for_job(job_id: str, state: str, assigned_at: datetime, started_at: datetime | None) -> Change | None:
    """The karma a job's outcome earns; None when it changes nothing (cancelled, never delivered)."""
    match state:
        case "succeeded":
            if started_at is None:
                return Change(JOB_SUCCEEDED_SLOW, f"Job {job_id} succeeded, but never reported its start")
            latency = started_at - assigned_at
            took = describe_duration(latency)
            if latency <= QUICK_START:
                return Change(JOB_SUCCEEDED_QUICK, f"Job {job_id} succeeded; started {took} after assignment")
            if latency <= SLOW_START:
                return Change(JOB_SUCCEEDED, f"Job {job_id} succeeded; started {took} after assignment")
            return Change(
                JOB_SUCCEEDED_SLOW, f"Job {job_id} succeeded, but started slowly: {took} after assignment"
            )
        case "failed":
            return Change(JOB_FAILED, f"Job {job_id} failed")
        case "timed_out":
            return Change(JOB_TIMED_OUT, f"Job {job_id} timed out: no final state before its lease expired")
        case "cancelled" | "withdrawn" | "undelivered":
            return None
        case _:
            raise ValueError(f"{state!r} is not a terminal job state")


@dataclass(frozen=True)
class DisconnectionStep:
    index: int
    due_at: datetime
    delta: Decimal
    reason: str


def disconnection_steps(silent_since: datetime, until: datetime) -> list[DisconnectionStep]:
    """The charges of an incident that began at `silent_since` and lasted up to `until`.

    `until` is when it ended, or the present moment while it lasts. A step is
    included when it fell due strictly before `until`.
    """
    steps: list[DisconnectionStep] = []
    for index in range(1, DISCONNECTION_MAX_STEPS + 1):
        offline_for = DISCONNECTION_GRACE + (index - 1) * DISCONNECTION_STEP
        due_at = silent_since + offline_for
        if due_at >= until:
            break
        reason = f"Offline without signing off for {describe_duration(offline_for)}"
        if index == DISCONNECTION_MAX_STEPS:
            reason += " (the most one disconnection costs)"
        steps.append(DisconnectionStep(index, due_at, DISCONNECTION_STEP_PENALTY, reason))
    return steps


def disconnection_cost(duration: timedelta) -> Decimal:
    """What a whole silent disconnection lasting `duration` costs in all (≤ 0)."""
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    return sum((step.delta for step in disconnection_steps(epoch, epoch + duration)), Decimal(0))


def disconnection_cap() -> Decimal:
    """The most one incident can cost (≤ 0)."""
    return DISCONNECTION_MAX_STEPS * DISCONNECTION_STEP_PENALTY


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """00:00 and 24:00 UTC of `day`."""
    start = datetime.combine(day, time(0), tzinfo=UTC)
    return start, start + timedelta(days=1)


def days_to_judge(last_judged: date | None, now: datetime) -> list[date]:
    """The ended UTC days the uptime rule should judge at `now`, oldest first.

    A day is ready UPTIME_SETTLE after it ends. The first time (nothing judged
    yet) only the latest ready day is judged; after that each day once, and at
    most UPTIME_LOOKBACK_DAYS of them if the watcher was stopped for long.
    """
    latest = (now.astimezone(UTC) - UPTIME_SETTLE).date() - timedelta(days=1)
    if last_judged is None:
        return [latest]
    earliest = max(latest - timedelta(days=UPTIME_LOOKBACK_DAYS - 1), last_judged + timedelta(days=1))
    return [earliest + timedelta(days=n) for n in range((latest - earliest).days + 1)]


def uptime_reason(day: date) -> str:
    return f"Online all day on {day:%Y-%m-%d} (UTC)"


@dataclass(frozen=True)
class Standing:
    """Where a score stands: its level, the next one, and the way there."""

    score: Decimal
    level: Level
    next_level: Level | None
    # Whole percent of the way from this level's threshold to the next one's,
    # rounded down (so 100 means "there"); 100 at the top level.
    percent: int
    to_go: Decimal

    @property
    def top(self) -> bool:
        return self.next_level is None


def standing(score: Decimal) -> Standing:
    score = clamp(Decimal(score))
    index = max(n for n, level in enumerate(LEVELS) if level.threshold <= score)
    level = LEVELS[index]
    if index + 1 == len(LEVELS):
        return Standing(score, level, None, 100, Decimal(0))
    following = LEVELS[index + 1]
    span = following.threshold - level.threshold
    fraction = (score - level.threshold) / span * 100
    percent = int(fraction.to_integral_value(rounding=ROUND_FLOOR))
    return Standing(score, level, following, percent, following.threshold - score)


def level_ranges() -> list[tuple[Level, Decimal]]:
    """Each level with the score where it ends (the next threshold, or MAXIMUM)."""
    ends = [level.threshold for level in LEVELS[1:]] + [MAXIMUM]
    return list(zip(LEVELS, ends, strict=True))


def placement_weight(karma: Decimal) -> float:
    """An Island's weight in the draw for a job: karma ** EXPONENT, 0 below the floor."""
    if karma < PLACEMENT_FLOOR:
        return 0.0
    return math.pow(float(karma), PLACEMENT_EXPONENT)


def on_probation(jobs_completed: int) -> bool:
    """Whether an Island with this many completed jobs is still on probation."""
    return jobs_completed < PROBATION_JOBS


def draw_weight(karma: Decimal, jobs_completed: int) -> float:
    """An Island's weight in the draw: its karma's, or at most PROBATION_KARMA's while on probation."""
    if on_probation(jobs_completed):
        return placement_weight(min(karma, PROBATION_KARMA))
    return placement_weight(karma)
