"""Admin roles: each admin action runs only for staff whose permissions allow it.

The roles are the groups `manage.py admin_roles` creates (docs/deploy.md):
support sees everything and changes nothing; operators also suspend,
remove, adjust karma, cancel jobs and revoke Island keys; revoking a
dispatcher key, and everything about accounts, is for superusers. For each
action, support staff are not offered it and posting it anyway changes
nothing, while the role meant to run it can (so the test would notice an
action that does nothing for anyone).
"""

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.admin.options import ActionLocation
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.test import Client, RequestFactory
from django.utils import timezone

from islands.models import DispatcherKey, Island, IslandKey, Job
from karma.models import KarmaEvent
from notify.models import EmailAddress
from tests.islands.conftest import give_job, make_island

SUPPORT = "Support (view only)"
OPERATORS = "Operators"


@dataclass(frozen=True)
class Case:
    """One admin action: where it is, what it acts on, and what it changes."""

    model: type[Any]
    action: str
    # Makes the rows the action is tried on; returns their primary keys.
    build: Callable[[User], list[Any]]
    # What the action changes, read back from the database.
    state: Callable[[list[Any]], Any]
    # The group meant to run it; None when only superusers may.
    role: str | None
    # Extra fields of the POST (an intermediate form's answer).
    extra: dict[str, str] | None = None

    @property
    def url(self) -> str:
        return f"/admin/{self.model._meta.app_label}/{self.model._meta.model_name}/"

    @property
    def id(self) -> str:
        return f"{self.model._meta.label}.{self.action}"


def islands(owner: User, **fields: Any) -> list[Any]:
    return [make_island(owner, f"roles-host-{n:04d}", **fields).pk for n in range(2)]


def island_state(pks: list[Any]) -> Any:
    rows = Island.objects.filter(pk__in=pks).order_by("pk")
    return [(i.removed_at, i.token_hash, i.suspended_at, i.karma) for i in rows]


def tokened_islands(owner: User) -> list[Any]:
    pks = islands(owner)
    for island in Island.objects.filter(pk__in=pks):
        island.issue_token()
    return pks


def jobs(owner: User) -> list[Any]:
    island = make_island(owner, "roles-jobs-0001")
    return [give_job(island=island, job_id=f"roles-job-{n}", credits=Decimal(1)).pk for n in range(2)]


def dispatcher_keys(owner: User) -> list[Any]:
    return [DispatcherKey.objects.issue(f"dispatcher {n}")[0].pk for n in range(2)]


def island_keys(owner: User) -> list[Any]:
    IslandKey.objects.issue(owner, count=2)
    return list(IslandKey.objects.values_list("pk", flat=True))


def email_addresses(owner: User) -> list[Any]:
    return [EmailAddress.objects.add(owner, "alice@example.com", timezone.now()).pk]


CASES = [
    Case(Island, "remove_islands", tokened_islands, island_state, OPERATORS),
    Case(Island, "suspend_islands", islands, island_state, OPERATORS),
    Case(
        Island,
        "unsuspend_islands",
        lambda owner: islands(owner, suspended_at=timezone.now()),
        island_state,
        OPERATORS,
    ),
    Case(
        Island,
        "adjust_karma",
        islands,
        lambda pks: (island_state(pks), KarmaEvent.objects.count()),
        OPERATORS,
        {"apply": "1", "delta": "-40", "reason": "Tried by support"},
    ),
    Case(
        Job,
        "cancel_jobs",
        jobs,
        lambda pks: list(Job.objects.filter(pk__in=pks).order_by("pk").values_list("state", flat=True)),
        OPERATORS,
    ),
    Case(
        DispatcherKey,
        "revoke_keys",
        dispatcher_keys,
        lambda pks: list(DispatcherKey.objects.filter(pk__in=pks).values_list("revoked_at", flat=True)),
        None,
    ),
    Case(
        IslandKey,
        "revoke_keys",
        island_keys,
        lambda pks: list(IslandKey.objects.filter(pk__in=pks).values_list("revoked_at", flat=True)),
        OPERATORS,
    ),
    # Django's own delete action, where the admin offers it at all.
    Case(
        EmailAddress,
        "delete_selected",
        email_addresses,
        lambda pks: EmailAddress.objects.filter(pk__in=pks).count(),
        None,
        {"post": "yes"},
    ),
]


def staff(username: str, group: str | None) -> Client:
    user = User.objects.create_user(username, f"{username}@example.com", "x", is_staff=True)
    if group is not None:
        user.groups.add(Group.objects.get(name=group))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def roles(db: None) -> None:
    call_command("admin_roles", verbosity=0)


def post_action(client: Client, case: Case, pks: list[Any]) -> Any:
    data = {"action": case.action, "_selected_action": [str(pk) for pk in pks], **(case.extra or {})}
    return client.post(case.url, data, follow=True)


def offered(client: Client, case: Case) -> bool:
    listing = client.get(case.url)
    assert listing.status_code == 200
    return f'<option value="{case.action}">' in listing.content.decode()


def test_every_admin_action_declares_permissions_and_is_tried_here(admin_user):
    # A superuser is offered every action anyone may run, and any action
    # that declares no permissions at all.
    request = RequestFactory().get("/admin/")
    request.user = admin_user
    found = set()
    for model, model_admin in admin.site._registry.items():
        for location in ActionLocation:
            for action in model_admin.get_actions(request, location).values():
                label = f"{model._meta.label}.{action.name}"
                assert getattr(action.func, "allowed_permissions", ()), f"{label} declares no permissions"
                found.add(label)
    project_actions = {name for name in found if not name.endswith(".delete_selected")}
    tried = {case.id for case in CASES}
    assert project_actions <= tried, f"untested admin actions: {sorted(project_actions - tried)}"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_support_staff_are_not_offered_the_action_and_posting_it_changes_nothing(roles, alice, case):
    pks = case.build(alice)
    before = case.state(pks)
    support = staff("support", SUPPORT)
    assert not offered(support, case)
    response = post_action(support, case, pks)
    # Without an action it may run, the changelist treats the post as a look at the list.
    assert response.status_code == 200
    assert list(response.context["messages"]) == []
    assert case.state(pks) == before


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_the_role_meant_to_run_the_action_runs_it(roles, alice, admin_user, case):
    pks = case.build(alice)
    before = case.state(pks)
    if case.role is None:
        operator = staff("operator", OPERATORS)
        assert not offered(operator, case)
        post_action(operator, case, pks)
        assert case.state(pks) == before
        runner = Client()
        runner.force_login(admin_user)
    else:
        runner = staff("runner", case.role)
    assert offered(runner, case)
    post_action(runner, case, pks)
    assert case.state(pks) != before


def test_support_staff_see_every_list_and_change_nothing_on_an_islands_page(roles, alice):
    island = make_island(alice)
    support = staff("support", SUPPORT)
    for model in admin.site._registry:
        url = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
        assert support.get(url).status_code == 200, url
    page = support.get(f"/admin/islands/island/{island.pk}/change/")
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
    assert support.post(f"/admin/islands/island/{island.pk}/change/", {"name": "Renamed"}).status_code == 403
    island.refresh_from_db()
    assert island.name != "Renamed"


def test_the_roles_command_is_idempotent_and_repairs_a_group(roles):
    support = Group.objects.get(name=SUPPORT)
    count = support.permissions.count()
    support.permissions.clear()
    call_command("admin_roles", verbosity=0)
    call_command("admin_roles", verbosity=0)
    assert Group.objects.filter(name__in=[SUPPORT, OPERATORS]).count() == 2
    assert support.permissions.count() == count
    assert not support.permissions.exclude(codename__startswith="view_").exists()
