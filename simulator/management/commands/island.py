import sys
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from simulator.desktop import (
    DEFAULT_INTERVAL,
    DEFAULT_STATE_PATH,
    CoordinatorError,
    IslandSimulator,
    stop_on_sigterm,
)
from simulator.phone import run_phone_command


class Command(BaseCommand):
    help = "Act as the Island software over the HTTP API: pair with a coordinator and report in."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="The coordinator's base URL.")
        parser.add_argument(
            "--state",
            type=Path,
            default=DEFAULT_STATE_PATH,
            help=f"Where the host id and token are kept (default {DEFAULT_STATE_PATH}).",
        )
        parser.add_argument(
            "--interval",
            type=float,
            default=DEFAULT_INTERVAL,
            help=f"Seconds between heartbeats (default {DEFAULT_INTERVAL:g}).",
        )
        parser.add_argument(
            "--mobile",
            metavar="QR_OR_CODE",
            help="Act as a phone instead: pair with the QR code's text from /pair/mobile, or the code "
            "beside it (state in ~/.island/phone.json unless --state is given).",
        )
        parser.add_argument("--platform", choices=["ios", "android"], default="ios", help="With --mobile.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["mobile"]:
            return run_phone_command(options, sys.stdout)
        simulator = IslandSimulator(
            options["url"], state_path=options["state"], out=sys.stdout, interval=options["interval"]
        )
        try:
            with stop_on_sigterm():
                simulator.run()
        except CoordinatorError as exc:
            raise CommandError(f"The coordinator refused: {exc} (HTTP {exc.status})") from exc
        except KeyboardInterrupt:
            self.stdout.write("Stopped.")
