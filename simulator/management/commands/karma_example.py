"""The worked example of docs/karma.md: a simulated day of one Island, through the real code.

Heartbeats, jobs and the watcher's steps go through the same methods the API
and `watch_islands` call, at simulated times; the table printed is the
Island's karma ledger afterwards. Everything runs in one transaction that is
rolled back, and only on a database with no Islands, so nothing real is
touched and no real Island's history changes what the example shows.
"""

import logging
from argparse import ArgumentParser
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from archipelag.management.commands.watch_islands import Command as Watcher
from islands.agent import EnhancedHeartbeat
from islands.models import Beat, Island, Job
from karma import rules
from karma.models import KarmaEvent, UptimeSweep
from karma.templatetags.karma_tags import points, signed

# The simulated span: the day before (to earn an uptime bonus), the day of
# the example, and the minutes after midnight when that day is judged.
START = datetime(2026, 3, 1, tzinfo=UTC)
DAY = START + timedelta(days=1)
END = DAY + timedelta(days=1, minutes=5)
# The real agent beats every 10 s; every 40 s stays inside the 45 s
# deadline and makes the same history with a quarter of the writes.
HEARTBEAT_EVERY = timedelta(seconds=40)
# The two-hour silent disconnection: the last heartbeat is 45 s before it
# starts, and the Island is back at its end.
SILENT_FROM = DAY + timedelta(hours=13)
SILENT_UNTIL = DAY + timedelta(hours=15)
LEASE = timedelta(minutes=10)
# (assigned at, job id, time to start or None for never, final state)
JOBS = [
    (timedelta(hours=8), "example-01", timedelta(seconds=4), "succeeded"),
    (timedelta(hours=9, minutes=30), "example-02", timedelta(seconds=6), "succeeded"),
    (timedelta(hours=10, minutes=15), "example-03", timedelta(seconds=40), "succeeded"),
    (timedelta(hours=11), "example-04", timedelta(seconds=3), "succeeded"),
    (timedelta(hours=16), "example-05", timedelta(seconds=5), "failed"),
    (timedelta(hours=17, minutes=30), "example-06", timedelta(seconds=2), "succeeded"),
    (timedelta(hours=19), "example-07", timedelta(seconds=9), "succeeded"),
    (timedelta(hours=21), "example-08", None, "succeeded"),
    (timedelta(hours=22, minutes=30), "example-09", timedelta(seconds=3), "cancelled"),
]
JOB_RUNS = timedelta(minutes=2)

ONLINE = msgspec.convert({"status": "online"}, EnhancedHeartbeat)


class Rollback(Exception):
    pass


@contextmanager
def quiet(logger_name: str) -> Iterator[None]:
    """The watcher logs every event; the table says it all."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class Command(BaseCommand):
    help = (
        "Print the worked example of docs/karma.md: an Island's karma events over a simulated day "
        "of jobs with one failure and a two-hour silent disconnection. Needs a database without "
        "Islands; rolls everything back."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--watch-every",
            type=int,
            default=5,
            help="Minutes between the watcher's steps (default 5). Only the Recorded column depends on it.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if Island.objects.exists() or UptimeSweep.objects.exists():
            raise CommandError(
                "karma_example runs on a database without Islands, e.g. "
                "DATABASE_URL=sqlite:////tmp/karma-example.sqlite3 (migrate it first)."
            )
        try:
            with transaction.atomic(), quiet("archipelag.islands"):
                self.stdout.write(self.simulate(options["watch_every"]))
                raise Rollback
        except Rollback:
            pass

    def simulate(self, watch_minutes: int) -> str:
        watch_every = timedelta(minutes=watch_minutes)
        owner = User.objects.create_user("karma-example")
        island = Island.objects.create(
            owner=owner, host_id="karma-example-0001", name="Example Island", gpu_model="RTX 4090"
        )
        jobs = sorted(
            [(DAY + at, job_id, start, state) for at, job_id, start, state in JOBS],
            key=lambda job: job[0],
        )
        # One timeline of what happens, in time order: heartbeats (none while
        # silent), job reports, and watcher steps.
        timeline: list[tuple[datetime, int, Any]] = []
        at = START - timedelta(seconds=30)
        while at <= END:
            if not SILENT_FROM - timedelta(seconds=45) < at < SILENT_UNTIL:
                timeline.append((at, 0, ("beat",)))
            at += HEARTBEAT_EVERY
        # The last heartbeat before the silence, and the first one after it.
        timeline.append((SILENT_FROM - timedelta(seconds=45), 0, ("beat",)))
        timeline.append((SILENT_UNTIL, 0, ("beat",)))
        for assigned, job_id, start, state in jobs:
            timeline.append((assigned, 1, ("assign", job_id)))
            if start is not None:
                timeline.append((assigned + start, 1, ("report", job_id, "started")))
            timeline.append((assigned + (start or timedelta(0)) + JOB_RUNS, 1, ("report", job_id, state)))
        at = START
        while at <= END:
            timeline.append((at, 2, ("watch",)))
            at += watch_every
        watcher = Watcher()
        for at, _, action in sorted(timeline, key=lambda item: (item[0], item[1])):
            match action:
                case ("beat",):
                    Island.objects.record_heartbeats([Beat(ONLINE, at, host_id=island.host_id)])
                case ("assign", job_id):
                    Job.objects.assign(
                        island=island,
                        job_id=job_id,
                        workload="llm-chat",
                        credits=Decimal(1),
                        lease=LEASE,
                        now=at,
                    )
                case ("report", job_id, state):
                    Job.objects.apply_status(island, job_id, state, now=at)
                case ("watch",):
                    watcher.handle_one(at)
        return self.table(island, watch_minutes)

    def table(self, island: Island, watch_minutes: int) -> str:
        island.refresh_from_db()
        lines = [
            f"Worked example: {island.name}, {START:%Y-%m-%d %H:%M} to {END:%Y-%m-%d %H:%M} UTC.",
            "Online from just before midnight; nine jobs on "
            f"{DAY:%Y-%m-%d}, one of them failed and one cancelled; silent (no heartbeats, no sign-off) "
            f"from {SILENT_FROM:%H:%M} to {SILENT_UNTIL:%H:%M}. The watcher steps every {watch_minutes} min.",
            "",
            f"{'When (UTC)':<20} {'Change':>6} {'Karma':>6}  {'Recorded':<8}  Reason",
        ]
        for event in KarmaEvent.objects.filter(island=island).order_by("id"):
            recorded = "" if event.created_at == event.effective_at else f"{event.created_at:%H:%M:%S}"
            lines.append(
                f"{event.effective_at:%Y-%m-%d %H:%M:%S}  {signed(event.delta):>6} "
                f"{points(event.score_after):>6}  {recorded:<8}  {event.reason}"
            )
        standing = rules.standing(island.karma)
        progress = (
            "top level"
            if standing.next_level is None
            else f"{standing.percent}% to {standing.next_level.name}"
        )
        lines += [
            "",
            f"Karma: {points(rules.START)} -> {points(island.karma)} ({standing.level.name}, {progress}). "
            f"Jobs completed {island.jobs_completed}, failed {island.jobs_failed}.",
            "Recorded is when the watcher applied a change, where that differs from when it happened.",
        ]
        if not island.karma_events.filter(cause=KarmaEvent.Cause.UPTIME, day=DAY.date()).exists():
            lines.append(f"No uptime bonus for {DAY:%Y-%m-%d}: the disconnection broke the day.")
        return "\n".join(lines)
