"""A fleet of simulated Islands at different karma, for watching placement: `island --fleet`.

Pairing each simulator by typing its code is tedious for a demo of many, so
the fleet makes its Islands in this service's database the way a confirmed
pairing does (a desktop Island of this machine's hardware, on the HTTP
transport, with an API token issued), for an account that exists, and gives
each its own karma by a recorded administrator event whose reason says it
was the demo fleet. Then it runs one desktop simulator per Island, in
threads, over the HTTP API with those tokens, exactly as `manage.py island`
runs one: heartbeats (with their capacity and runtimes), the jobs poll,
status reports, the sign-off when stopped. Nothing about how jobs are
placed is simulated: the coordinator at `url` places them.

Running it again for the same account takes the same Islands back (their host
ids are `demo-<user id>-<n>`), issues them new tokens and sets their karma
back to the targets, again by recorded events.
"""

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TextIO

import msgspec
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from islands.agent import Capabilities
from islands.models import Attempt, Island
from karma import rules
from karma.models import KarmaEvent
from karma.templatetags.karma_tags import points
from simulator.desktop import (
    DEFAULT_RUNTIMES,
    SIMULATOR_VERSION,
    IslandSimulator,
    State,
    TokenRevoked,
    detect_hardware,
)

DEFAULT_SIZE = 3
# Karma from the top of the "Lighthouse" level down to just above the
# placement floor: with weights karma**2, 90 / 60 / 30 draw about 64 / 29 / 7 %.
HIGHEST, LOWEST = Decimal(90), Decimal(30)
# Room for a whole burst of demo jobs on each Island: a full Island drops out
# of the draw, so with little room the share would follow who has room, not
# karma. `--capacity 4` shows that instead.
DEFAULT_CAPACITY = 30
REASON = "demo fleet: karma set to {karma} by manage.py island --fleet"


class FleetError(Exception):
    """The fleet cannot start; the message says why and what to do."""


def spread(size: int) -> list[Decimal]:
    """`size` karma targets, evenly from HIGHEST down to LOWEST (whole points)."""
    if size == 1:
        return [HIGHEST]
    step = (HIGHEST - LOWEST) / (size - 1)
    return [(HIGHEST - step * n).quantize(Decimal(1)) for n in range(size)]


def host_id(owner: User, n: int) -> str:
    # Usable as a NATS subject token too (no dots), whatever the username is.
    return f"demo-{owner.pk}-{n}"


@dataclass(frozen=True)
class Member:
    island: Island
    token: str
    karma: Decimal


def assemble(owner: User, karmas: Sequence[Decimal], now: datetime | None = None) -> list[Member]:
    """The fleet's Islands for `owner`, made or taken back, with fresh tokens and the karma asked for."""
    now = now or timezone.now()
    hardware = msgspec.convert(detect_hardware(), Capabilities)
    members: list[Member] = []
    for n, karma in enumerate(karmas, start=1):
        with transaction.atomic():
            island = Island.objects.linked_host(host_id(owner, n))
            if island is not None and island.owner_id != owner.pk:
                raise FleetError(
                    f"Host id {island.host_id} is linked to another account's Island; "
                    "the fleet will not touch it."
                )
            if island is None:
                island = Island(
                    owner=owner,
                    host_id=host_id(owner, n),
                    kind=Island.Kind.DESKTOP,
                    transport=Island.Transport.HTTP,
                    agent_version=SIMULATOR_VERSION,
                    name=f"Demo Island {n}",
                    paired_at=now,
                    # Stand-ins for Islands with a record, as their karma says:
                    # past probation, so the draw follows their karma at once.
                    jobs_completed=rules.PROBATION_JOBS,
                )
                island.take_capabilities(hardware)
                island.save(force_insert=True)
            token = island.issue_token(now)
            if island.karma != karma:
                KarmaEvent.objects.adjust(
                    island, karma - island.karma, REASON.format(karma=points(karma)), by=None, now=now
                )
            island.refresh_from_db()
        members.append(Member(island, token, island.karma))
    return members


def _napper(stop: threading.Event) -> Callable[[float], None]:
    """A simulator's sleep that ends, like Ctrl-C, when the fleet stops."""

    def nap(seconds: float) -> None:
        if stop.wait(seconds):
            raise KeyboardInterrupt

    return nap


class Fleet:
    """One simulator per member, each serving in a thread of its own."""

    def __init__(
        self,
        url: str,
        members: Sequence[Member],
        out: TextIO,
        interval: float,
        capacity: int = DEFAULT_CAPACITY,
        runtimes: Sequence[str] = DEFAULT_RUNTIMES,
    ):
        self.url = url.rstrip("/")
        self.members = list(members)
        self.out = out
        self.stop = threading.Event()
        width = max(len(member.island.name) for member in self.members)
        self.simulators = [
            IslandSimulator(
                self.url,
                state_path=None,
                state=State(
                    host_id=member.island.host_id,
                    paired=True,
                    island_id=str(member.island.pk),
                    token=member.token,
                    coordinator=self.url,
                ),
                out=out,
                sleep=_napper(self.stop),
                interval=interval,
                capacity=capacity,
                runtimes=runtimes,
                label=f"[{member.island.name:<{width}} karma {points(member.karma):>3}] ",
            )
            for member in self.members
        ]
        self.threads: list[tuple[threading.Thread, threading.Event]] = []
        self.started_at = timezone.now()

    def go_online(self) -> None:
        """One heartbeat each, before any thread starts: the coordinator must know these tokens."""
        for simulator in self.simulators:
            try:
                status = simulator.beat()
            except TokenRevoked:
                raise FleetError(
                    f"The coordinator at {self.url} does not know the fleet's tokens: is it serving "
                    "this database? Run the server and this command with the same DATABASE_URL."
                ) from None
            if status is None:
                raise FleetError(f"Nothing answers at {self.url}: start the server first (make run).")
            if status != 200:
                raise FleetError(f"The coordinator at {self.url} refused a heartbeat (HTTP {status}).")

    def start(self) -> None:
        self.started_at = timezone.now()
        for simulator in self.simulators:
            done = threading.Event()
            thread = threading.Thread(
                target=self._serve, args=(simulator, done), name=simulator.state.host_id
            )
            thread.start()
            self.threads.append((thread, done))

    def _serve(self, simulator: IslandSimulator, done: threading.Event) -> None:
        try:
            simulator.serve()
        except KeyboardInterrupt:
            pass  # stopped with the fleet; it signed off
        except TokenRevoked as exc:
            simulator.say(str(exc))
        except Exception as exc:
            # One Island's failure is said, and the others go on.
            simulator.say(f"Stopped: {exc!r}")
        finally:
            done.set()

    def wait(self) -> None:
        """Until every simulator has stopped (the command stops them on Ctrl-C or SIGTERM).

        It naps rather than joining the threads: Ctrl-C interrupting
        Thread.join() can leave a running thread marked as stopped
        (CPython 3.12's bpo-45274 handling), and a later join would then
        return before that Island signed off.
        """
        while not all(done.is_set() for _, done in self.threads):
            time.sleep(0.2)

    def shut_down(self) -> None:
        """Stop every simulator; each signs off before this returns."""
        self.stop.set()
        self.wait()
        for thread, _ in self.threads:
            thread.join()

    def share(self) -> list[dict[str, Any]]:
        """Where the jobs placed since the fleet started went, next to what karma's weights predict."""
        islands = [member.island.pk for member in self.members]
        placed = Counter(
            Attempt.objects.filter(island__in=islands, assigned_at__gte=self.started_at).values_list(
                "island_id", flat=True
            )
        )
        # Karma moves with every outcome (a success earns some), so a long
        # run drifts from the shares the starting karma gives: show both.
        now = dict(Island.objects.filter(pk__in=islands).values_list("pk", "karma"))
        weights = [rules.placement_weight(member.karma) for member in self.members]
        total_weight = sum(weights) or 1.0
        total = sum(placed.values())
        return [
            {
                "name": member.island.name,
                "karma": member.karma,
                "karma_now": now.get(member.island.pk, member.karma),
                "expected": weight / total_weight,
                "jobs": placed[member.island.pk],
                "share": placed[member.island.pk] / total if total else 0.0,
            }
            for member, weight in zip(self.members, weights, strict=True)
        ]
