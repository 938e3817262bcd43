import asyncio
import gc
import signal
from argparse import ArgumentParser
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from archipelag.nats import BATCH_SIZE, FLUSH_INTERVAL, QUEUE_GROUP, STATS_INTERVAL, WRITERS, Bridge, redact


class Command(BaseCommand):
    help = (
        "Answer the real Island agent over NATS: pairing, registration, heartbeats, "
        "job states and lease renewals. Runs until stopped (Ctrl-C or SIGTERM), then "
        "drains its subscriptions and writes every heartbeat it received. Any number "
        "may run at once: they share the subjects as one NATS queue group."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--url",
            default=None,
            help="NATS server URL, or several separated by commas (default: the NATS_URL setting).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=BATCH_SIZE,
            help=f"Write heartbeats once this many hosts are waiting (default {BATCH_SIZE}).",
        )
        parser.add_argument(
            "--flush-ms",
            type=int,
            default=int(FLUSH_INTERVAL * 1000),
            help=f"... or once the oldest waited this long (default {int(FLUSH_INTERVAL * 1000)}).",
        )
        parser.add_argument(
            "--writers",
            type=int,
            default=WRITERS,
            help=f"Heartbeat batches written at once (default {WRITERS}).",
        )
        parser.add_argument(
            "--stats-interval",
            type=float,
            default=STATS_INTERVAL,
            help=f"Seconds between counter log lines (default {STATS_INTERVAL:g}).",
        )
        parser.add_argument(
            "--queue-group", default=QUEUE_GROUP, help=f"NATS queue group (default {QUEUE_GROUP})."
        )
        parser.add_argument(
            "--subject-prefix",
            default="",
            help="Prefix every subject (tests and benchmarks on a shared server; the agent uses none).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        servers = [url.strip() for url in (options["url"] or settings.NATS_URL).split(",") if url.strip()]
        if not servers:
            raise CommandError("no NATS server: set NATS_URL or pass --url")
        if min(options["batch_size"], options["flush_ms"], options["writers"]) < 1:
            raise CommandError("--batch-size, --flush-ms and --writers must be positive")
        bridge = Bridge(
            servers,
            prefix=options["subject_prefix"],
            queue=options["queue_group"],
            batch_size=options["batch_size"],
            flush_interval=options["flush_ms"] / 1000,
            writers=options["writers"],
            stats_interval=options["stats_interval"],
        )
        where = ", ".join(redact(url) for url in servers)
        self.stdout.write(f"Bridging NATS at {where} to the coordinator; Ctrl-C or SIGTERM stops.")
        self.stdout.flush()
        # Django and its imports leave a few hundred thousand long-lived
        # objects; every full collection would walk them again while thousands
        # of heartbeats are in flight. Frozen, the collector skips them.
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        asyncio.run(self._serve(bridge))
        self.stdout.write("Stopped.")

    async def _serve(self, bridge: Bridge) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, bridge.stop)
        await bridge.run()
