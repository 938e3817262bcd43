import logging
import signal
import threading
import time
from argparse import ArgumentParser
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand
from django.db import DatabaseError, InterfaceError, close_old_connections, connection
from django.utils import timezone

from islands.models import WATCH_BATCH, Island, Job
from karma.models import KarmaEvent
from notify.alerts import record_returns
from notify.sender import send_due

logger = logging.getLogger("archipelag.islands")


@dataclass(frozen=True)
class Step:
    silences: int
    timeouts: int
    karma: int = 0
    requeued: int = 0
    returns: int = 0

    @property
    def full(self) -> bool:
        """A full batch means more may be waiting: go again without sleeping."""
        return max(self.silences, self.timeouts, self.karma, self.requeued, self.returns) >= WATCH_BATCH


class Command(BaseCommand):
    help = (
        "Watch Islands: record each one that stops sending heartbeats as offline, "
        "time out the jobs whose lease expired and place them again, apply the karma rules "
        "for disconnections and days of uptime, and record the alerts hosts are sent "
        "(send_notifications sends them). "
        "Runs until stopped (Ctrl-C or SIGTERM); any number may run at once."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--interval", type=float, default=2.0, help="Seconds to rest between idle steps (default 2)."
        )
        parser.add_argument("--once", action="store_true", help="Do one step and exit (for cron or checks).")
        parser.add_argument(
            "--no-send",
            action="store_true",
            help="Do not send notifications from this process (when send_notifications runs on its own).",
        )

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
        # After karma, so a return's message can say what the silence cost.
        # Only outbox rows are written here; sending is send_notifications'
        # job, so slow mail or webhooks never hold the watcher up.
        returns = record_returns(now)
        return Step(
            silences=len(silences),
            timeouts=len(timeouts),
            karma=len(karma),
            requeued=requeued,
            returns=returns,
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["once"]:
            self.handle_one()
            return
        self.stopping = False
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.stdout.write(f"Watching Islands every {options['interval']:g} s; Ctrl-C or SIGTERM stops.")
        sender = None
        if not options["no_send"]:
            # Its own thread and database connection: a slow mail server or
            # webhook receiver never delays the watcher's steps.
            sender = threading.Thread(target=self._send_loop, args=(options["interval"],), daemon=True)
            sender.start()
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
        if sender is not None:
            sender.join(timeout=15)
        self.stdout.write("Stopped.")

    def _send_loop(self, interval: float) -> None:
        """What send_notifications does, in a thread of the watcher (see --no-send)."""
        try:
            while not self.stopping:
                close_old_connections()
                try:
                    sent = send_due(timezone.now())
                except (DatabaseError, InterfaceError):
                    logger.exception("event=send_failed; retrying after the interval")
                    sent = 0
                if not sent:
                    self._rest(interval)
        finally:
            connection.close()

    def _rest(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, seconds))

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
