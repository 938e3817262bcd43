from argparse import ArgumentParser
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from islands.models import ISLAND_KEY_BATCH_MAX, IslandKey


class Command(BaseCommand):
    help = (
        "Mint Island keys for a user (one per machine) and print each key's host_id and nats_url "
        "as tab-separated lines. The secrets are shown this once."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("username", help="The account the Islands will belong to.")
        parser.add_argument("--count", type=int, default=1, help=f"How many keys (1-{ISLAND_KEY_BATCH_MAX}).")

    def handle(self, *args: Any, **options: Any) -> None:
        count = options["count"]
        if not 1 <= count <= ISLAND_KEY_BATCH_MAX:
            raise CommandError(f"--count must be between 1 and {ISLAND_KEY_BATCH_MAX}.")
        try:
            owner = get_user_model().objects.get(username=options["username"])
        except get_user_model().DoesNotExist:
            raise CommandError(f"No user named {options['username']!r}.") from None
        for item in IslandKey.objects.issue(owner, count):
            self.stdout.write(f"{item.key.host_id}\t{item.nats_url}")
        self.stderr.write(
            f"{count} key(s) created for {owner.username}. Put host_id at the top of each Island's "
            "config.toml and nats_url under [coordinator]. "
            "Unused keys expire in 24 hours; revoke keys at /settings."
        )
