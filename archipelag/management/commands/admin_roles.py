from typing import Any

from django.contrib import admin
from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.db.models import Q

SUPPORT = "Support (view only)"
OPERATORS = "Operators"
# What operators may do beyond looking, as "app_label.codename": the admin
# actions that act on Islands, jobs and Island keys (each declares the
# permission it needs; docs/deploy.md has the table). Revoking a dispatcher
# key stops every job submission and stays with superusers, as does
# anything about accounts and groups.
OPERATOR_PERMISSIONS = (
    # Suspend, lift a suspension, remove (and rename from an Island's page).
    "islands.change_island",
    # Record a job for a named Island, as the dispatcher does.
    "islands.add_job",
    # Cancel jobs (no job's fields can be edited whatever the permission).
    "islands.change_job",
    # Revoke Island keys.
    "islands.change_islandkey",
    # Adjust karma: records an admin karma event per Island.
    "karma.add_karmaevent",
)


def _permissions(labels: list[str]) -> list[Permission]:
    query = Q(pk__in=[])
    for label in labels:
        app_label, codename = label.split(".")
        query |= Q(content_type__app_label=app_label, codename=codename)
    found = list(Permission.objects.filter(query).select_related("content_type"))
    missing = set(labels) - {f"{p.content_type.app_label}.{p.codename}" for p in found}
    if missing:
        raise CommandError(f"no such permission: {', '.join(sorted(missing))} (run migrate first)")
    return found


def view_permissions() -> list[str]:
    """Viewing every model the admin shows: what support staff need to answer questions."""
    labels = []
    for model in admin.site._registry:
        labels.append(f"{model._meta.app_label}.view_{model._meta.model_name}")
    return sorted(labels)


class Command(BaseCommand):
    help = (
        f"Create or update the admin's staff groups: {SUPPORT!r} (sees everything, changes nothing) "
        f"and {OPERATORS!r} (also suspends and removes Islands, adjusts karma, cancels jobs and "
        "revokes Island keys). Idempotent: run it on every deploy; it sets each group's permissions "
        "to exactly these. Superusers need no group."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        support_labels = view_permissions()
        with transaction.atomic():
            for name, labels in (
                (SUPPORT, support_labels),
                (OPERATORS, [*support_labels, *OPERATOR_PERMISSIONS]),
            ):
                group, created = Group.objects.get_or_create(name=name)
                group.permissions.set(_permissions(labels))
                if options["verbosity"]:
                    self.stdout.write(
                        f"{'Created' if created else 'Updated'} {name!r}: {len(labels)} permissions"
                    )
