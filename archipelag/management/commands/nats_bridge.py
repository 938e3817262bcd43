import asyncio
import gc
import signal
from argparse import ArgumentParser
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from archipelag.nats import (
    BATCH_SIZE,
    CLAIM_SECONDS,
    FLUSH_INTERVAL,
    OUTBOX_BATCH,
    QUEUE_GROUP,
    STATS_INTERVAL,
    STREAM,
    WRITERS,
    Bridge,
    redact,
)


class Command(BaseCommand):
    help = (
        "Answer the real Island agent over NATS: pairing, registration, heartbeats, "
        "job states and lease renewals; and publish the outbox (AssignJobs into the JOBS "
        "stream, which it creates when missing, cancels, deletions). Runs until stopped "
        "(Ctrl-C or SIGTERM), then drains its subscriptions, writes every heartbeat it "
        "received and finishes the outbox batch in hand. Any number may run at once: they "
        "share the subjects as one NATS queue group and the outbox by claims."
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
        parser.add_argument(
            "--stream",
            default=None,
            help=f"The JetStream stream of AssignJobs (default {STREAM}, the name the agent looks up; "
            f"with --subject-prefix, one named after the prefix).",
        )
        parser.add_argument(
            "--outbox-batch",
            type=int,
            default=OUTBOX_BATCH,
            help=f"Outbox messages claimed and sent at once (default {OUTBOX_BATCH}).",
        )
        parser.add_argument(
            "--claim-seconds",
            type=float,
            default=CLAIM_SECONDS,
            help="How long a claimed outbox message is this bridge's before another may take it "
            f"over (default {CLAIM_SECONDS:g}).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        servers = [url.strip() for url in (options["url"] or settings.NATS_URL).split(",") if url.strip()]
        if not servers:
            raise CommandError("no NATS server: set NATS_URL or pass --url")
        if min(options["batch_size"], options["flush_ms"], options["writers"], options["outbox_batch"]) < 1:
            raise CommandError("--batch-size, --flush-ms, --writers and --outbox-batch must be positive")
        if options["claim_seconds"] < 1:
            raise CommandError("--claim-seconds must be at least 1")
        bridge = Bridge(
            servers,
            prefix=options["subject_prefix"],
            queue=options["queue_group"],
            batch_size=options["batch_size"],
            flush_interval=options["flush_ms"] / 1000,
            writers=options["writers"],
            stats_interval=options["stats_interval"],
            stream=options["stream"],
            outbox_batch=options["outbox_batch"],
            claim_seconds=options["claim_seconds"],
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
