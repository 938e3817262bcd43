"""Karma: a ledger of events, each one changing an Island's score by a rule.

The numbers and the rules' arithmetic live in karma/rules.py; this module
applies them to recorded facts (jobs, status changes, the clock of recorded
times) and keeps the ledger and the score in step.
"""

from collections import defaultdict
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models import Exists, OuterRef, Q, Subquery
from django.utils import timezone

from islands.models import WATCH_BATCH, Attempt, Island, Job, MaintenanceWindow, StatusChange
from karma import rules, signals

if TYPE_CHECKING:
    from django.contrib.auth.models import User

# What a manual adjustment may move the score by, either way.
MAX_ADJUSTMENT = rules.MAXIMUM - rules.MINIMUM
REASON_MAX_LENGTH = 200


class KarmaEventManager(models.Manager["KarmaEvent"]):
    def apply(
        self,
        island_id: Any,
        requested: Decimal,
        *,
        cause: "KarmaEvent.Cause",
        reason: str,
        effective_at: datetime,
        now: datetime | None = None,
        still_due: Callable[[], bool] | None = None,
        **ref: Any,
    ) -> "KarmaEvent | None":
        """Record one event and move the Island's score by it, once per cause.

        The Island's row is locked first, so events of one Island apply one
        at a time and each sees the score the previous one left. The score is
        clamped to MINIMUM..MAXIMUM: the event keeps both the delta the rule
        asked for (`requested_delta`) and the one applied (`delta`), and
        `score_after`. `ref` names the cause (job, status_change and step,
        day); a cause already recorded raises IntegrityError on its unique
        constraint, and then nothing changes and None is returned. So does a
        `still_due` check, made under the lock, that returns False.
        """
        requested = Decimal(requested).quantize(rules.PLACES)
        now = now or timezone.now()
        with transaction.atomic():
            # NO KEY: inserting jobs and events for this Island (FK checks)
            # stays unblocked, as in record_heartbeats.
            score = (
                Island.objects.select_for_update(no_key=True)
                .filter(pk=island_id)
                .values_list("karma", flat=True)
                .get()
            )
            if still_due is not None and not still_due():
                return None
            after = rules.clamp(score + requested)
            try:
                with transaction.atomic():
                    event = self.create(
                        island_id=island_id,
                        cause=cause,
                        reason=reason[:REASON_MAX_LENGTH],
                        requested_delta=requested,
                        delta=after - score,
                        score_after=after,
                        effective_at=effective_at,
                        created_at=now,
                        **ref,
                    )
            except IntegrityError:
                # Only a repeat of a recorded cause is expected; anything
                # else (a violated check) is a bug and must not pass silently.
                if self._recorded(island_id, cause, ref):
                    return None
                raise
            if after != score:
                Island.objects.filter(pk=island_id).update(karma=after)
            signals.score_changed.send(sender=KarmaEvent, event=event, before=score)
        return event

    def _recorded(self, island_id: Any, cause: "KarmaEvent.Cause", ref: dict[str, Any]) -> bool:
        """Whether the cause `ref` names in full is already in the ledger."""
        key = CAUSE_KEYS.get(cause)
        given = {name.removesuffix("_id"): value for name, value in ref.items()}
        if key is None or any(given.get(name) is None for name in key):
            return False
        return self.filter(island_id=island_id, cause=cause, **{name: given[name] for name in key}).exists()

    # --- Jobs ----------------------------------------------------------------------

    def record_attempt(self, attempt_pk: int, now: datetime | None = None) -> "KarmaEvent | None":
        """The job rule, for one attempt at a job: called in the transaction that ended the attempt.

        Each attempt is judged once (a unique constraint per attempt): a job
        that timed out on one Island and succeeded on another costs the first
        and rewards the second.
        """
        attempt = Attempt.objects.filter(pk=attempt_pk).values(
            "job_id", "job__job_id", "island_id", "outcome", "assigned_at", "started_at", "finished_at"
        )[0]
        change = rules.for_job(
            attempt["job__job_id"], attempt["outcome"], attempt["assigned_at"], attempt["started_at"]
        )
        if change is None:
            return None
        assert attempt["finished_at"] is not None  # set with every outcome
        return self.apply(
            attempt["island_id"],
            change.delta,
            cause=KarmaEvent.Cause.JOB,
            reason=change.reason,
            effective_at=attempt["finished_at"],
            now=now,
            job_id=attempt["job_id"],
            attempt_id=attempt_pk,
        )

    # --- Disconnections --------------------------------------------------------------

    def charge_disconnections(self, now: datetime, limit: int = WATCH_BATCH) -> list["KarmaEvent"]:
        """Charge every disconnection step that fell due by `now`. The watcher's step.

        Looks at the silences not yet settled that are older than the grace
        period: the incidents going on, and those that ended since the last
        step. Each step is charged once (a unique constraint per silence and
        step) and dated when it fell due, so a late, repeated or concurrent
        watcher charges exactly what a punctual one would. An incident that
        can owe nothing more is marked settled. At most `limit` events per call.
        """
        later = StatusChange.objects.filter(island=OuterRef("island")).filter(
            Q(at__gt=OuterRef("at")) | Q(at=OuterRef("at"), pk__gt=OuterRef("pk"))
        )
        incidents = list(
            StatusChange.objects.filter(
                reason=StatusChange.Reason.SILENCE,
                karma_settled_at__isnull=True,
                at__lt=now - rules.DISCONNECTION_GRACE,
            )
            .annotate(ended_at=Subquery(later.order_by("at", "pk").values("at")[:1]))
            .order_by("at", "pk")
            .values_list("pk", "island_id", "at", "ended_at", "island__removed_at")
        )
        charged: defaultdict[int, set[int]] = defaultdict(set)
        for silence_pk, index in self.filter(
            cause=KarmaEvent.Cause.DISCONNECTION, status_change_id__in=[row[0] for row in incidents]
        ).values_list("status_change_id", "step"):
            if silence_pk is not None and index is not None:
                charged[silence_pk].add(index)

        # Steps falling due inside a maintenance window are never charged: a
        # window may begin during a silence and stops the charges from then.
        windows: defaultdict[Any, list[tuple[datetime, datetime]]] = defaultdict(list)
        for island_id, opens, closes in MaintenanceWindow.objects.filter(
            island_id__in={row[1] for row in incidents}
        ).values_list("island_id", "starts_at", "ends_at"):
            windows[island_id].append((opens, closes))

        events: list[KarmaEvent] = []
        for silence_pk, island_id, since, ended_at, removed_at in incidents:
            # Removing an Island is deliberate, like a sign-off: it ends the incident.
            ends = [moment for moment in (ended_at, removed_at) if moment is not None]
            end = min(ends) if ends else None
            steps = rules.disconnection_steps(since, min(end, now) if end else now)
            owed = [
                step
                for step in steps
                if step.index not in charged[silence_pk]
                and not any(opens <= step.due_at < closes for opens, closes in windows[island_id])
            ]
            for step in owed:
                if len(events) >= limit:
                    return events
                event = self.apply(
                    island_id,
                    step.delta,
                    cause=KarmaEvent.Cause.DISCONNECTION,
                    reason=step.reason,
                    effective_at=step.due_at,
                    now=now,
                    still_due=_still_silent(island_id, silence_pk, since, step.due_at),
                    status_change_id=silence_pk,
                    step=step.index,
                )
                if event is not None:
                    events.append(event)
            finished = end is not None and end <= now
            if finished or len(steps) == rules.DISCONNECTION_MAX_STEPS:
                StatusChange.objects.filter(pk=silence_pk, karma_settled_at__isnull=True).update(
                    karma_settled_at=now
                )
        return events

    # --- Uptime --------------------------------------------------------------------

    def reward_uptime(self, now: datetime) -> list["KarmaEvent"]:
        """Give the uptime bonus for each ended day not judged yet. The watcher's step.

        Each day is judged once (UptimeSweep), and each Island rewarded once
        per day (a unique constraint), however many watchers run.
        """
        last = UptimeSweep.objects.order_by("-day").values_list("day", flat=True).first()
        events: list[KarmaEvent] = []
        for day in rules.days_to_judge(last, now):
            rewarded = 0
            for island_id in online_all_day(day).order_by("pk").values_list("pk", flat=True):
                event = self.apply(
                    island_id,
                    rules.UPTIME_DAY_BONUS,
                    cause=KarmaEvent.Cause.UPTIME,
                    reason=rules.uptime_reason(day),
                    effective_at=rules.day_bounds(day)[1],
                    now=now,
                    day=day,
                )
                if event is not None:
                    events.append(event)
                    rewarded += 1
            UptimeSweep.objects.get_or_create(day=day, defaults={"judged_at": now, "rewarded": rewarded})
        return events

    def run_rules(self, now: datetime) -> list["KarmaEvent"]:
        """The watcher's karma step: disconnections going on or just ended, and ended days."""
        return self.charge_disconnections(now) + self.reward_uptime(now)

    # --- People ----------------------------------------------------------------------

    def adjust(
        self, island: Island, delta: Decimal, reason: str, *, by: "User | None", now: datetime | None = None
    ) -> "KarmaEvent":
        """A manual adjustment by an administrator, recorded like any other event."""
        if not reason.strip():
            raise ValueError("an adjustment needs a reason")
        if abs(delta) > MAX_ADJUSTMENT:
            raise ValueError(f"an adjustment moves karma by at most {MAX_ADJUSTMENT}")
        now = now or timezone.now()
        event = self.apply(
            island.pk,
            delta,
            cause=KarmaEvent.Cause.ADMIN,
            reason=reason.strip(),
            effective_at=now,
            now=now,
            actor=by,
        )
        assert event is not None  # admin events have no uniqueness to collide with
        return event


def _still_silent(island_id: Any, silence_pk: int, since: datetime, due_at: datetime) -> Callable[[], bool]:
    """A check, made under the Island's lock, that no change ended the incident by `due_at`.

    Heartbeats lock the Island's row to record a return, so once the charge
    holds that lock, any return received before now has committed and is seen.
    """

    def check() -> bool:
        return (
            not StatusChange.objects.filter(island_id=island_id, at__lte=due_at)
            .filter(Q(at__gt=since) | Q(at=since, pk__gt=silence_pk))
            .exists()
        )

    return check


class KarmaEvent(models.Model):
    """One change of one Island's karma, with its reason and its cause.

    The Island's score is the running sum of its events in the order they were
    applied (by id), each clamped to the range: `score_after` of one event plus
    the next one's `delta` is the next one's `score_after`.
    """

    class Cause(models.TextChoices):
        JOB = "job", "Job"
        DISCONNECTION = "disconnection", "Disconnection"
        UPTIME = "uptime", "Uptime"
        ADMIN = "admin", "Administrator"

    # db_index off: karmaevent_island_idx below starts with the island.
    island = models.ForeignKey(Island, on_delete=models.CASCADE, related_name="karma_events", db_index=False)
    cause = models.CharField(max_length=16, choices=Cause.choices)
    reason = models.CharField(max_length=REASON_MAX_LENGTH)
    # What the rule (or administrator) asked for, and what clamping to
    # 0..100 let through; they differ only at the ends of the range.
    requested_delta = models.DecimalField(max_digits=6, decimal_places=2)
    delta = models.DecimalField(max_digits=6, decimal_places=2)
    score_after = models.DecimalField(max_digits=5, decimal_places=2)
    # When the cause happened, from recorded times (a job's finished_at, the
    # moment a disconnection step fell due, the end of an uptime day), and
    # when the event was recorded, which is later if the watcher ran late.
    effective_at = models.DateTimeField()
    created_at = models.DateTimeField(default=timezone.now)

    # The cause: exactly the fields of its kind are set (karmaevent_cause_shape).
    job = models.ForeignKey(Job, null=True, blank=True, on_delete=models.CASCADE, related_name="karma_events")
    # Which attempt at the job: a job placed again after a timeout is judged per Island.
    attempt = models.ForeignKey(
        Attempt, null=True, blank=True, on_delete=models.CASCADE, related_name="karma_events"
    )
    # The silence that opened the disconnection, and which step of it this is.
    status_change = models.ForeignKey(
        StatusChange, null=True, blank=True, on_delete=models.CASCADE, related_name="karma_events"
    )
    step = models.PositiveSmallIntegerField(null=True, blank=True)
    day = models.DateField(null=True, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    objects = KarmaEventManager()

    class Meta:
        ordering = ["-id"]
        constraints = [
            # Idempotency lives here, not in Python: a redelivered job status,
            # a watcher that runs twice or two watchers at once collide on
            # one of these, and the second insert fails. Admin events are
            # exempt: two adjustments are two adjustments.
            models.UniqueConstraint(
                fields=["attempt"], condition=Q(cause="job"), name="karmaevent_once_per_attempt"
            ),
            models.UniqueConstraint(
                fields=["status_change", "step"],
                condition=Q(cause="disconnection"),
                name="karmaevent_once_per_disconnection_step",
            ),
            models.UniqueConstraint(
                fields=["island", "day"], condition=Q(cause="uptime"), name="karmaevent_once_per_uptime_day"
            ),
            models.CheckConstraint(
                condition=(
                    Q(
                        cause="job",
                        job__isnull=False,
                        attempt__isnull=False,
                        status_change__isnull=True,
                        day__isnull=True,
                    )
                    | Q(
                        cause="disconnection",
                        status_change__isnull=False,
                        step__isnull=False,
                        job__isnull=True,
                        day__isnull=True,
                    )
                    | Q(cause="uptime", day__isnull=False, job__isnull=True, status_change__isnull=True)
                    | Q(cause="admin", job__isnull=True, status_change__isnull=True, day__isnull=True)
                ),
                name="karmaevent_cause_shape",
            ),
            models.CheckConstraint(
                condition=Q(score_after__gte=rules.MINIMUM, score_after__lte=rules.MAXIMUM),
                name="karmaevent_score_in_range",
            ),
        ]
        indexes = [
            # Serves the Island page and the admin's inline: an Island's events
            # newest first, in the order they were applied. Also serves the FK.
            # (The watcher's lookup of charged steps uses the unique index of
            # karmaevent_once_per_disconnection_step.)
            models.Index(fields=["island", "-id"], name="karmaevent_island_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.delta:+} {self.reason}"

    @property
    def capped(self) -> bool:
        """Clamping changed what the rule asked for."""
        return self.delta != self.requested_delta


# The fields that identify each kind of cause, as its unique constraint does
# (per Island, for uptime days). Admin events have none.
CAUSE_KEYS: dict[str, tuple[str, ...]] = {
    KarmaEvent.Cause.JOB: ("attempt",),
    KarmaEvent.Cause.DISCONNECTION: ("status_change", "step"),
    KarmaEvent.Cause.UPTIME: ("day",),
}


class UptimeSweep(models.Model):
    """A UTC day the uptime rule has judged, so each day is judged once, not every step."""

    day = models.DateField(primary_key=True)
    judged_at = models.DateTimeField()
    rewarded = models.PositiveIntegerField(help_text="Islands that were online all day.")

    class Meta:
        ordering = ["-day"]

    def __str__(self) -> str:
        return f"{self.day:%Y-%m-%d}: {self.rewarded} Island(s) online all day"


def online_all_day(day: date) -> "models.QuerySet[Island, Any]":
    """Active Islands online throughout the UTC day `day` (see rules, "Uptime")."""
    start, end = rules.day_bounds(day)
    changes = StatusChange.objects.filter(island=OuterRef("pk"))
    status_at_start = changes.filter(at__lte=start).order_by("-at", "-pk").values("to_status")[:1]
    return (
        Island.objects.active()
        .annotate(status_at_start=Subquery(status_at_start))
        .filter(status_at_start=Island.Status.ONLINE)
        .exclude(Exists(changes.filter(at__gt=start, at__lte=end)))
        .filter(Q(offline_after__gt=end) | Exists(changes.filter(at__gt=end)))
    )
