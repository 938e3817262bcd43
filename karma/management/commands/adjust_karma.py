"""`manage.py adjust_karma`: the admin's karma adjustment, from a shell or a script."""

import uuid
from argparse import ArgumentParser
from typing import Any

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError

from islands.models import Island
from karma.forms import KarmaAdjustmentForm
from karma.models import KarmaEvent
from karma.templatetags.karma_tags import points

ISLAND_ID, HOST_ID = "island-id", "host-id"


def find_island(named: str, only: str | None = None) -> Island:
    """The one Island `named` names, by its Island id or its host id; a CommandError otherwise.

    A host id names the host's active Island: a host that paired, was removed
    and paired again has one active Island and older removed ones, which only
    their Island ids name. A name matching one Island's id and another's host
    id (host ids are chosen by hosts, and may be any UUID) is refused, never
    guessed: `only` says which it is.
    """
    found: dict[Any, Island] = {}
    if only != HOST_ID:
        try:
            pk = uuid.UUID(named)
        except ValueError:
            pk = None
        if pk is not None:
            found |= {island.pk: island for island in Island.objects.filter(pk=pk)}
    removed: list[Island] = []
    if only != ISLAND_ID:
        found |= {island.pk: island for island in Island.objects.active().filter(host_id=named)}
        removed = list(Island.objects.filter(host_id=named, removed_at__isnull=False).order_by("removed_at"))
    if len(found) > 1:
        described = "; ".join(_describe(island) for island in found.values())
        raise CommandError(
            f"'{named}' names more than one Island ({described}): "
            f"say which with --only {ISLAND_ID} or --only {HOST_ID}."
        )
    if found:
        return next(iter(found.values()))
    if removed:
        described = "; ".join(_describe(island) for island in removed)
        raise CommandError(
            f"Host '{named}' has no active Island, only removed ones ({described}): "
            "name one by its Island id."
        )
    what = {ISLAND_ID: "Island id", HOST_ID: "host id"}.get(only or "", "Island id or host id")
    raise CommandError(f"No Island has the {what} '{named}'.")


def _describe(island: Island) -> str:
    removed = f", removed {island.removed_at:%Y-%m-%d %H:%M} UTC" if island.removed_at else ""
    return f"Island {island.pk}, host {island.host_id}, “{island.name}”{removed}"


class Command(BaseCommand):
    help = (
        "Change an Island's karma by DELTA points with a reason, recorded as an administrator's "
        "event (what the admin's 'Adjust karma' action does)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("island", help="The Island's id, or the host id of its machine.")
        parser.add_argument("delta", help="Points to add, e.g. 5 or -7.5 (at most two decimal places).")
        parser.add_argument(
            "--reason", required=True, help="Why; the Island's owner sees it with the change."
        )
        parser.add_argument(
            "--by", metavar="USERNAME", help="The staff member making the change, recorded as its actor."
        )
        parser.add_argument(
            "--only",
            choices=[ISLAND_ID, HOST_ID],
            help="Read ISLAND as only an Island id, or only a host id (when it could be either).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        # The admin's form: the same limits and the same words for what is wrong.
        form = KarmaAdjustmentForm({"delta": options["delta"], "reason": options["reason"]})
        if not form.is_valid():
            problems = []
            for name, errors in form.errors.get_json_data().items():
                said = " ".join(error["message"] for error in errors)
                problems.append(f"{'--reason' if name == 'reason' else name}: {said}")
            raise CommandError("; ".join(problems))
        actor = self._actor(options["by"])
        island = find_island(options["island"], options["only"])
        event = KarmaEvent.objects.adjust(
            island, form.cleaned_data["delta"], form.cleaned_data["reason"], by=actor
        )
        by = f" by {actor.username}" if actor else ""
        self.stdout.write(
            f"Recorded karma event #{event.pk} for “{island.name}” "
            f"(Island {island.pk}, host {island.host_id}){by}: {event.delta:+} {event.reason}"
        )
        if event.delta != event.requested_delta:
            self.stdout.write(
                f"Asked for {event.requested_delta:+}; karma stays between 0 and 100, "
                f"so it moved {event.delta:+}."
            )
        # From the event itself: the score may have moved since the Island was read.
        before = event.score_after - event.delta
        self.stdout.write(f"Karma: {points(before)} -> {points(event.score_after)}")

    def _actor(self, username: str | None) -> User | None:
        if username is None:
            return None
        user = User.objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user '{username}' to record as the actor.")
        if not (user.is_active and user.is_staff):
            raise CommandError(
                f"'{username}' is not active staff: only staff adjust karma, in the admin or here."
            )
        return user
