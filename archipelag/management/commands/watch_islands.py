import logging
import signal
import time
from argparse import ArgumentParser
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand
from django.db import DatabaseError, InterfaceError, close_old_connections
from django.utils import timezone

from islands.models import WATCH_BATCH, Island, Job
from karma.models import KarmaEvent

logger = logging.getLogger("archipelag.islands")


@dataclass(frozen=True)
class Step:
    silences: int
    timeouts: int
    karma: int = 0
    requeued: int = 0

    @property
    def full(self) -> bool:
        """A full batch means more may be waiting: go again without sleeping."""
        return max(self.silences, self.timeouts, self.karma, self.requeued) >= WATCH_BATCH


class Command(BaseCommand):
    help = (
        "Watch Islands: record each one that stops sending heartbeats as offline, "
        "time out the jobs whose lease expired and place them again, and apply the karma rules "
        "for disconnections and days of uptime. "
        "Runs until stopped (Ctrl-C or SIGTERM); any number may run at once."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--interval", type=float, default=2.0, help="Seconds to rest between idle steps (default 2)."
        )
        parser.add_argument("--once", action="store_true", help="Do one step and exit (for cron or checks).")

    def handle_one(self, now: datetime | None = None) -> Step:
        """One pass over everything overdue at `now`. Tests call this, never the loop."""
        now = now or timezone.now()
        silences = Island.objects.record_silences(now)
        for change in silences:
            logger.info("event=island_silent island_id=%s since=%s", change.island_id, change.at.isoformat())
        timeouts = Job.objects.time_out_expired(now)
        for job_id in timeouts:
            logger.info("event=job_timed_out job_id=%s", job_id)
        # Jobs waiting for an Island since a timeout: placed, or failed at last.
        requeued = Job.objects.place_queued(now)
        # Fresh draw turns for Islands left behind (docs/dispatch.md), so draws
        # do not walk past them.
        Island.objects.refresh_turns()
        # After the silences, so that an incident recorded just now is seen;
        # every charge is dated by recorded times, not by this step's clock.
        karma = KarmaEvent.objects.run_rules(now)
        for event in karma:
            logger.info(
                "event=karma island_id=%s cause=%s delta=%s score=%s",
                event.island_id,
                event.cause,
                event.delta,
                event.score_after,
            )
        return Step(silences=len(silences), timeouts=len(timeouts), karma=len(karma), requeued=requeued)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["once"]:
            self.handle_one()
            return
        self.stopping = False
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.stdout.write(f"Watching Islands every {options['interval']:g} s; Ctrl-C or SIGTERM stops.")
        while not self.stopping:
            # With CONN_MAX_AGE=0 this hands the connection back between steps,
            # so a restarted database costs one failed step, not the process.
            close_old_connections()
            try:
                step = self.handle_one()
            except (DatabaseError, InterfaceError):
                # InterfaceError (a connection already closed under us) is
                # not a DatabaseError in DB-API's hierarchy; both are retried.
                logger.exception("event=watch_failed; retrying after the interval")
                step = Step(silences=0, timeouts=0)
            if not step.full:
                self._rest(options["interval"])
        self.stdout.write("Stopped.")

    def _rest(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, seconds))

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
