import asyncio
import signal
from argparse import ArgumentParser
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from archipelag.nats_auth import AuthService


class Command(BaseCommand):
    help = (
        "Answer the NATS server's auth callout: admit each Island key with permissions for its own "
        "host id only, the legacy shared user only if NATS_ALLOW_LEGACY_USER is on, and refuse the "
        "rest. Connects with NATS_URL (the service's own user). Runs until Ctrl-C or SIGTERM; any "
        "number may run at once (one queue group)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--url", default=None, help="NATS server URL (default: the NATS_URL setting).")
        parser.add_argument("--subject-prefix", default="", help="Prefix of the agent subjects (tests only).")
        parser.add_argument(
            "--stream", default="JOBS", help="The JetStream stream of AssignJobs (default JOBS)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        asyncio.run(
            self._run(options["url"] or settings.NATS_URL, options["subject_prefix"], options["stream"])
        )

    async def _run(self, url: str, prefix: str, stream: str) -> None:
        service = AuthService(url, prefix=prefix, stream=stream)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service.start()
        self.stderr.write(
            f"nats_auth: answering auth callouts as issuer {service.signer.public_key.decode()}"
        )
        try:
            await stop.wait()
        finally:
            await service.stop()
            await service.flush_usage()
