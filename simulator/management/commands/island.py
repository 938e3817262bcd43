import sys
from argparse import ArgumentParser
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError

from karma import rules
from karma.templatetags.karma_tags import points
from simulator import fleet
from simulator.desktop import (
    DEFAULT_CAPACITY,
    DEFAULT_INTERVAL,
    DEFAULT_RUNTIMES,
    DEFAULT_STATE_PATH,
    CoordinatorError,
    IslandSimulator,
    stop_on_sigterm,
)
from simulator.phone import run_phone_command

# Threads, each heartbeating and polling: plenty for a demo on one machine.
MAX_FLEET = 20


class Command(BaseCommand):
    help = (
        "Act as the Island software over the HTTP API: pair with a coordinator and report in. "
        "With --fleet N --owner USER: N Islands at different karma, made directly in this "
        "service's database for USER, taking jobs over HTTP."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="The coordinator's base URL.")
        parser.add_argument(
            "--state",
            type=Path,
            default=None,
            help=f"Where the host id and token are kept (default {DEFAULT_STATE_PATH}).",
        )
        parser.add_argument(
            "--interval",
            type=float,
            default=DEFAULT_INTERVAL,
            help=f"Seconds between heartbeats (default {DEFAULT_INTERVAL:g}).",
        )
        parser.add_argument(
            "--capacity",
            type=int,
            default=None,
            help=f"Jobs it runs at once, as its heartbeats tell placement (default {DEFAULT_CAPACITY}; "
            f"{fleet.DEFAULT_CAPACITY} for each Island of a fleet).",
        )
        parser.add_argument(
            "--runtimes",
            default=",".join(DEFAULT_RUNTIMES),
            help="The runtimes it offers, comma-separated (default %(default)s).",
        )
        parser.add_argument(
            "--mobile",
            metavar="QR_OR_CODE",
            help="Act as a phone instead: pair with the QR code's text from /pair/mobile, or the code "
            "beside it (state in ~/.island/phone.json unless --state is given).",
        )
        parser.add_argument("--platform", choices=["ios", "android"], default="ios", help="With --mobile.")
        parser.add_argument(
            "--fleet",
            type=int,
            metavar="N",
            help="Run N simulated Islands at once, at karma spread from 90 down to 30, for --owner. "
            "They are made (or taken back) directly in this service's database, as a pairing "
            "would make them, so the server at --url must use the same database.",
        )
        parser.add_argument("--owner", metavar="USERNAME", help="With --fleet: the account they belong to.")
        parser.add_argument(
            "--karma",
            metavar="K1,K2,...",
            help="With --fleet: each Island's karma, set by a recorded admin event (default: spread).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["fleet"] is not None:
            return self.run_fleet(options)
        if options["owner"] or options["karma"]:
            raise CommandError("--owner and --karma go with --fleet.")
        if options["mobile"]:
            return run_phone_command({**options, "state": options["state"] or DEFAULT_STATE_PATH}, sys.stdout)
        simulator = IslandSimulator(
            options["url"],
            state_path=options["state"] or DEFAULT_STATE_PATH,
            out=sys.stdout,
            interval=options["interval"],
            capacity=self._capacity(options, DEFAULT_CAPACITY),
            runtimes=self._runtimes(options),
        )
        try:
            with stop_on_sigterm():
                simulator.run()
        except CoordinatorError as exc:
            raise CommandError(f"The coordinator refused: {exc} (HTTP {exc.status})") from exc
        except KeyboardInterrupt:
            self.stdout.write("Stopped.")

    def _capacity(self, options: dict[str, Any], default: int) -> int:
        capacity = options["capacity"] if options["capacity"] is not None else default
        if not 1 <= capacity <= 4096:
            raise CommandError("--capacity: from 1 to 4096 jobs at once.")
        return int(capacity)

    def _runtimes(self, options: dict[str, Any]) -> list[str]:
        runtimes = [name.strip().lower() for name in options["runtimes"].split(",") if name.strip()]
        if not runtimes:
            raise CommandError("--runtimes: name at least one, e.g. container,wasm.")
        return runtimes

    # --- A fleet -------------------------------------------------------------------------

    def run_fleet(self, options: dict[str, Any]) -> None:
        size = options["fleet"]
        if not 1 <= size <= MAX_FLEET:
            raise CommandError(f"--fleet: from 1 to {MAX_FLEET} Islands.")
        if options["mobile"] or options["state"]:
            raise CommandError("--fleet runs desktop Islands kept in memory: leave out --mobile and --state.")
        if not options["owner"]:
            raise CommandError(
                "--fleet needs --owner USERNAME: the account its Islands belong to "
                "(sign up at /accounts/signup/ first, or use createsuperuser)."
            )
        owner = User.objects.filter(username=options["owner"]).first()
        if owner is None:
            raise CommandError(f"No user '{options['owner']}': sign up at /accounts/signup/ first.")
        karmas = self._karmas(options["karma"], size)
        capacity = self._capacity(options, fleet.DEFAULT_CAPACITY)
        try:
            members = fleet.assemble(owner, karmas)
        except fleet.FleetError as exc:
            raise CommandError(str(exc)) from None
        for member in members:
            below = (
                " (below the placement floor: it gets no jobs)"
                if member.karma < rules.PLACEMENT_FLOOR
                else ""
            )
            self.stdout.write(
                f"{member.island.name} (host {member.island.host_id}, Island {member.island.pk}): "
                f"karma {points(member.karma)}{below}, up to {capacity} jobs at once"
            )
        demo = fleet.Fleet(
            options["url"],
            members,
            out=sys.stdout,
            interval=options["interval"],
            capacity=capacity,
            runtimes=self._runtimes(options),
        )
        try:
            demo.go_online()
        except fleet.FleetError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"{size} Island(s) of {owner.username} online at {demo.url}. Submit jobs with "
            "POST /api/v1/jobs (README: Watch karma steer jobs). Ctrl-C stops them (they sign off) "
            "and shows where the jobs went."
        )
        try:
            with stop_on_sigterm():
                demo.start()
                demo.wait()
        except KeyboardInterrupt:
            demo.shut_down()
        self._report(demo)

    def _karmas(self, given: str | None, size: int) -> list[Decimal]:
        if given is None:
            return fleet.spread(size)
        try:
            karmas = [Decimal(part.strip()) for part in given.split(",")]
        except InvalidOperation:
            raise CommandError("--karma: numbers, comma-separated, e.g. 90,60,30.") from None
        if len(karmas) != size:
            raise CommandError(f"--karma: one value per Island ({size}), e.g. 90,60,30.")
        for karma in karmas:
            if not (rules.MINIMUM <= karma <= rules.MAXIMUM) or karma != karma.quantize(rules.PLACES):
                raise CommandError(
                    f"--karma: each from {rules.MINIMUM} to {rules.MAXIMUM}, at most two decimal places."
                )
        return karmas

    def _report(self, demo: fleet.Fleet) -> None:
        rows = demo.share()
        total = sum(row["jobs"] for row in rows)
        width = max(len(row["name"]) for row in rows)
        self.stdout.write(f"Jobs placed on the fleet while it ran: {total}")
        self.stdout.write(f"  {'Island':<{width}}  karma  karma² share  jobs  share  karma now")
        for row in rows:
            self.stdout.write(
                f"  {row['name']:<{width}}  {points(row['karma']):>5}  {row['expected']:>11.1%}"
                f"  {row['jobs']:>4}  {row['share']:>5.1%}  {points(row['karma_now']):>9}"
            )
        self.stdout.write(
            "Karma moves with each job's outcome (a success earns some), so over many jobs the "
            "share drifts from the starting karma's toward the current karma's."
        )
        self.stdout.write("Stopped.")
