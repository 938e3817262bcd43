from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand

from islands.models import DispatcherKey


class Command(BaseCommand):
    help = "Create an API key for the dispatcher to record jobs (POST /api/v1/jobs). Prints it once."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("name", help="Who or what will use the key, e.g. 'dispatcher eu-1'.")

    def handle(self, *args: Any, **options: Any) -> None:
        row, key = DispatcherKey.objects.issue(options["name"][:100])
        self.stdout.write(key)
        self.stderr.write(
            f"Dispatcher key #{row.pk} ({row.name}) created. This is the only time it is shown: "
            "only its hash is stored. Send it as 'Authorization: Bearer <key>'. Revoke it in the admin."
        )
