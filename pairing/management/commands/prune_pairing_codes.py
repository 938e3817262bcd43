from argparse import ArgumentParser
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand
from django.utils import timezone

from pairing.models import MobilePairingSession, PairingCode


class Command(BaseCommand):
    help = (
        "Delete pairing codes and mobile pairing sessions that expired more than --days ago "
        "(run it daily, e.g. from cron)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--days", type=int, default=7, help="How long expired codes are kept for audit.")

    def handle(self, *args: Any, **options: Any) -> None:
        now, days = timezone.now(), options["days"]
        keep = timedelta(days=days)
        deleted = PairingCode.objects.prune(now, keep=keep)
        self.stdout.write(f"Deleted {deleted} pairing codes that expired more than {days} days ago.")
        deleted = MobilePairingSession.objects.prune(now, keep=keep)
        self.stdout.write(
            f"Deleted {deleted} mobile pairing sessions that expired more than {days} days ago."
        )
