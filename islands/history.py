"""An Island's last 30 UTC days, for its page: uptime, jobs, earnings and karma per day.

Uptime comes from the status-change ledger (StatusChange): each day is cut
into the time the Island spent online, down (silent without signing off),
signed off and in maintenance (down inside a window its owner announced,
MaintenanceWindow), and its share online is online ÷ (online + down), so a
sign-off or an announced maintenance neither helps nor hurts it, as with karma. Time before the
Island's first heartbeat, and the part of today still to come, count as
nothing. Jobs and earnings come from the attempts that ended that day,
karma from the karma events: six queries whatever the history's length.
"""

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from django.db.models import Count, Max, Q, Sum
from django.db.models.functions import TruncDate

from islands.models import Attempt, Island, MaintenanceWindow, StatusChange

DAYS = 30
# The uptime bar's states, in the order a day's segment stacks them.
SHOWN_STATES = ("online", "offline", "signed_off", "maintenance")
STATE_LABELS = {
    "online": "online",
    "offline": "down",
    "signed_off": "signed off",
    "maintenance": "maintenance",
}


@dataclass
class Day:
    day: date
    # Seconds spent in each recorded status, this UTC day.
    seconds: dict[str, float] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0
    earnings: Decimal = Decimal(0)
    karma: Decimal | None = None
    # Bar heights, as a percentage of the busiest day's (History fills them in).
    completed_height: float = 0.0
    failed_height: float = 0.0
    earned_height: float = 0.0

    @property
    def online_share(self) -> float | None:
        """Online ÷ (online + down), or None for a day with neither."""
        online = self.seconds.get("online", 0.0)
        down = self.seconds.get("offline", 0.0)
        return online / (online + down) if online + down else None

    @property
    def known(self) -> float:
        return sum(self.seconds.values())

    def parts(self) -> list[tuple[str, float]]:
        """Each state's share of the day's known time, in SHOWN_STATES order (for the bar's segment)."""
        known = self.known
        if not known:
            return []
        return [
            (state, 100 * self.seconds[state] / known) for state in SHOWN_STATES if self.seconds.get(state)
        ]

    @property
    def uptime_text(self) -> str:
        """The segment's title: "2026-12-01: 99.2% online", with what else the day held."""
        share = self.online_share
        if share is None:
            if self.seconds.get("signed_off"):
                return f"{self.day:%Y-%m-%d}: signed off all day"
            if self.seconds.get("maintenance"):
                return f"{self.day:%Y-%m-%d}: in maintenance all day"
            return f"{self.day:%Y-%m-%d}: no data"
        text = f"{self.day:%Y-%m-%d}: {_percent(share)} online"
        others = [
            f"{STATE_LABELS[state]} {_duration(seconds)}"
            for state in SHOWN_STATES[1:]
            if (seconds := self.seconds.get(state, 0.0)) >= 60
        ]
        return f"{text} ({', '.join(others)})" if others else text


@dataclass
class History:
    days: list[Day]

    def __post_init__(self) -> None:
        jobs, earned = self.most_jobs, self.most_earned
        for day in self.days:
            if jobs:
                day.completed_height = 100 * day.completed / jobs
                day.failed_height = 100 * day.failed / jobs
            if earned:
                day.earned_height = float(100 * day.earnings / earned)

    @property
    def online_share(self) -> float | None:
        online = sum(day.seconds.get("online", 0.0) for day in self.days)
        down = sum(day.seconds.get("offline", 0.0) for day in self.days)
        return online / (online + down) if online + down else None

    @property
    def online_text(self) -> str:
        share = self.online_share
        return "no data yet" if share is None else f"{_percent(share)} online"

    @property
    def most_jobs(self) -> int:
        return max((day.completed + day.failed for day in self.days), default=0)

    @property
    def most_earned(self) -> Decimal:
        return max((day.earnings for day in self.days), default=Decimal(0))

    def karma_points(self, width: int = 300, height: int = 60) -> str:
        """The karma line as SVG polyline points: x by day, y from 0 (bottom) to 100 (top)."""
        step = width / max(1, len(self.days) - 1)
        points = [
            f"{index * step:.1f},{height - float(day.karma) * height / 100:.1f}"
            for index, day in enumerate(self.days)
            if day.karma is not None
        ]
        return " ".join(points)

    @property
    def karma_first(self) -> Decimal | None:
        return next((day.karma for day in self.days if day.karma is not None), None)

    @property
    def karma_last(self) -> Decimal | None:
        return next((day.karma for day in reversed(self.days) if day.karma is not None), None)


def _percent(share: float) -> str:
    """99.2%, 100%; never a rounded "100%" for a day that had any down time."""
    text = f"{100 * share:.1f}"
    if share < 1 and text == "100.0":
        text = "99.9"
    return f"{text.removesuffix('.0')}%"


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min" if minutes % 60 else f"{minutes // 60} h"


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def island_history(island: Island, now: datetime, days: int = DAYS) -> History:
    """The last `days` UTC days of `island`, today last."""
    today = now.astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    start = _midnight(first)
    result = [Day(first + timedelta(days=n)) for n in range(days)]
    _add_uptime(island, result, start, now)
    _add_jobs(island, result, start)
    _add_karma(island, result, start)
    return History(result)


def _intervals(island: Island, start: datetime, now: datetime) -> list[tuple[str, datetime, datetime]]:
    """(status, from, to) covering [start, now] as the ledger recorded it; unknown time left out."""
    before = (
        StatusChange.objects.filter(island=island, at__lt=start)
        .order_by("-at", "-pk")
        .values("to_status")
        .first()
    )
    changes = list(
        StatusChange.objects.filter(island=island, at__gte=start, at__lte=now)
        .order_by("at", "pk")
        .values_list("at", "to_status")
    )
    # Before its first recorded change the Island had never been heard from.
    state: str | None = before["to_status"] if before else None
    since = start
    spans: list[tuple[str, datetime, datetime]] = []
    for at, to_status in changes:
        if state is not None and at > since:
            spans.append((state, since, at))
        state, since = to_status, max(at, start)
    if state is not None:
        # The watcher may not have recorded a silence yet: it began at the deadline.
        deadline = island.offline_after
        if state == "online" and deadline is not None and deadline < now:
            if deadline > since:
                spans.append((state, since, deadline))
            state, since = "offline", max(deadline, since)
        spans.append((state, since, now))
    return spans


def _excused(
    spans: list[tuple[str, datetime, datetime]], windows: list[tuple[datetime, datetime]]
) -> list[tuple[str, datetime, datetime]]:
    """The spans with the down time inside maintenance windows relabelled "maintenance"."""
    for starts, ends in sorted(windows):
        split: list[tuple[str, datetime, datetime]] = []
        for state, begin, end in spans:
            if state != "offline" or ends <= begin or starts >= end:
                split.append((state, begin, end))
                continue
            if begin < starts:
                split.append((state, begin, starts))
            split.append(("maintenance", max(begin, starts), min(end, ends)))
            if ends < end:
                split.append((state, ends, end))
        spans = split
    return spans


def _add_uptime(island: Island, days: list[Day], start: datetime, now: datetime) -> None:
    by_day = {day.day: day for day in days}
    windows = list(
        MaintenanceWindow.objects.filter(island=island, ends_at__gt=start, starts_at__lt=now).values_list(
            "starts_at", "ends_at"
        )
    )
    for state, begin, end in _excused(_intervals(island, start, now), windows):
        cursor = begin
        while cursor < end:
            midnight = _midnight(cursor.date() + timedelta(days=1))
            stop = min(end, midnight)
            day = by_day.get(cursor.astimezone(UTC).date())
            if day is not None:
                day.seconds[state] = day.seconds.get(state, 0.0) + (stop - cursor).total_seconds()
            cursor = stop


def _add_jobs(island: Island, days: list[Day], start: datetime) -> None:
    by_day = {day.day: day for day in days}
    failed = [Attempt.Outcome.FAILED, Attempt.Outcome.TIMED_OUT]
    rows = (
        Attempt.objects.filter(island=island, finished_at__gte=start)
        .annotate(day=TruncDate("finished_at", tzinfo=UTC))
        .values("day")
        .annotate(
            completed=Count("pk", filter=Q(outcome=Attempt.Outcome.SUCCEEDED)),
            failed=Count("pk", filter=Q(outcome__in=failed)),
            earned=Sum("credits", filter=Q(outcome=Attempt.Outcome.SUCCEEDED)),
        )
    )
    for row in rows:
        day = by_day.get(row["day"])
        if day is not None:
            day.completed, day.failed = row["completed"], row["failed"]
            day.earnings = row["earned"] or Decimal(0)


def _add_karma(island: Island, days: list[Day], start: datetime) -> None:
    """Each day's karma at its end: the score after its last event, carried over quiet days.

    The ledger's running sum goes in id order, so a day's closing score is
    the score after its newest event. Days before the Island was paired have none.
    """
    events = island.karma_events.all()
    before = (
        events.filter(effective_at__lt=start).order_by("-id").values_list("score_after", flat=True).first()
    )
    last_ids = (
        events.filter(effective_at__gte=start)
        .annotate(utc_day=TruncDate("effective_at", tzinfo=UTC))
        .values("utc_day")
        .annotate(last=Max("id"))
        .values_list("last", flat=True)
    )
    closing = {
        effective_at.astimezone(UTC).date(): score
        for effective_at, score in events.filter(id__in=last_ids).values_list("effective_at", "score_after")
    }
    score: Decimal = before if before is not None else Island._meta.get_field("karma").get_default()
    paired = island.paired_at.astimezone(UTC).date()
    for day in days:
        score = closing.get(day.day, score)
        if day.day >= paired:
            day.karma = score
