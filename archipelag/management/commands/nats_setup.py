import asyncio
from argparse import ArgumentParser
from typing import Any

import nats
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from nats.errors import Error as NatsError
from nats.js.api import StreamConfig

from archipelag.nats import (
    STREAM,
    StreamConflict,
    StreamSetup,
    Subjects,
    default_stream,
    describe_stream,
    jobs_stream_config,
    redact,
    setup_jobs_stream,
)


class Command(BaseCommand):
    help = (
        "Create the JetStream stream of AssignJobs (JOBS) for a deploy, or bring an existing one up "
        "to what the coordinator needs. Idempotent: run it on every deploy, before agents start "
        "(an agent looks the stream up once, when it starts)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--url",
            default=None,
            help="NATS server URL, or several separated by commas (default: the NATS_URL setting).",
        )
        parser.add_argument(
            "--stream",
            default=None,
            help=f"The stream's name (default {STREAM}, the name the agent looks up; with "
            "--subject-prefix, one named after the prefix).",
        )
        parser.add_argument(
            "--subject-prefix",
            default="",
            help="Prefix the stream's subjects, as the bridge's option of the same name does.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        servers = [url.strip() for url in (options["url"] or settings.NATS_URL).split(",") if url.strip()]
        if not servers:
            raise CommandError("no NATS server: set NATS_URL or pass --url")
        prefix = options["subject_prefix"]
        name = options["stream"] or default_stream(prefix)
        config = jobs_stream_config(name, Subjects(prefix))
        where = ", ".join(redact(url) for url in servers)
        try:
            setup = asyncio.run(self._setup(servers, config))
        except StreamConflict as exc:
            raise CommandError(
                f"{exc}. Delete it (nats stream rm {name}) and run nats_setup again."
            ) from None
        except (NatsError, OSError, TimeoutError) as exc:
            raise CommandError(f"could not set up stream {name} on {where}: {exc!r}") from None
        if setup.action == "created":
            self.stdout.write(f"Created stream {name} on {where}: {describe_stream(config)}.")
        elif setup.action == "updated":
            self.stdout.write(f"Updated stream {name} on {where}: {'; '.join(setup.changes)}.")
        else:
            self.stdout.write(f"Stream {name} on {where} is up to date.")

    async def _setup(self, servers: list[str], config: StreamConfig) -> StreamSetup:
        # A few tries a second apart (a server restarting with the deploy), then an answer.
        nc = await nats.connect(
            servers=servers,
            name="archipelag-nats-setup",
            allow_reconnect=False,
            connect_timeout=5,
            max_reconnect_attempts=3,
            reconnect_time_wait=1,
        )
        try:
            return await setup_jobs_stream(nc.jsm(timeout=10), config, update=True)
        finally:
            await nc.close()
