import logging
import signal
import time
from argparse import ArgumentParser
from datetime import datetime
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand
from django.db import DatabaseError, InterfaceError, close_old_connections
from django.utils import timezone

from notify.sender import send_due

logger = logging.getLogger("notify.sender")


class Command(BaseCommand):
    help = (
        "Send what hosts are told: claim due notification deliveries (emails, webhooks), send them, "
        "mark them sent, retry failures with backoff. Runs until stopped; any number may run at once."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--interval", type=float, default=2.0, help="Seconds to rest between idle steps (default 2)."
        )
        parser.add_argument("--once", action="store_true", help="Do one step and exit.")

    def handle_one(self, now: datetime | None = None) -> int:
        """One pass: everything due at `now`. Tests call this, never the loop."""
        return send_due(now or timezone.now())

    def handle(self, *args: Any, **options: Any) -> None:
        if options["once"]:
            self.handle_one()
            return
        self.stopping = False
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.stdout.write(f"Sending notifications every {options['interval']:g} s; Ctrl-C or SIGTERM stops.")
        while not self.stopping:
            close_old_connections()
            try:
                sent = self.handle_one()
            except (DatabaseError, InterfaceError):
                logger.exception("event=send_failed; retrying after the interval")
                sent = 0
            if not sent:
                self._rest(options["interval"])
        self.stdout.write("Stopped.")

    def _rest(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, seconds))

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
