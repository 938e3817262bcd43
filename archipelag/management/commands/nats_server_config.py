from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from archipelag.nats_auth import issuer


class Command(BaseCommand):
    help = (
        "Print a nats-server (2.10 or later) configuration for auth callout mode: the user in NATS_URL "
        "is the service's own (bridge and callout), every other connection is put to manage.py nats_auth, "
        "JetStream is on. Run: nats-server -c <file> -p <port> -sd <dir>."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        url = urlsplit(settings.NATS_URL)
        if not url.username or not url.password:
            raise CommandError(
                "NATS_URL must carry the service's user and password: nats://<user>:<password>@host:port"
            )
        for text in (url.username, url.password):
            if any(ch in text for ch in '"\\\n'):
                raise CommandError(
                    "The NATS_URL user and password may not contain quotes, backslashes or newlines."
                )
        self.stdout.write(
            "# Written by manage.py nats_server_config. Every client but the service's own user\n"
            "# is authenticated by manage.py nats_auth (auth callout); see docs/nats.md.\n"
            "jetstream: enabled\n"
            "authorization {\n"
            "  timeout: 5\n"
            f'  users: [ {{ user: "{url.username}", password: "{url.password}" }} ]\n'
            "  auth_callout {\n"
            f'    issuer: "{issuer().public_key.decode()}"\n'
            f'    auth_users: [ "{url.username}" ]\n'
            "  }\n"
            "}\n"
        )
