"""What the fuzz tests share: hypothesis profiles, a world of rows, snapshots, and the client's view.

Profiles (HYPOTHESIS_PROFILE picks one):

- `ci`, the default: a fixed number of examples per test, drawn
  deterministically (`derandomize`), so every run of `make test` and of CI
  tries the same inputs and a failure reproduces by rerunning;
- `thorough`: many more examples, drawn at random, with failing examples
  kept in .hypothesis/ (not committed) and replayed first next time.

Each example runs in a savepoint that it rolls back, so examples share only
the `world` built once per test and cannot see each other's writes.
"""

import json
import os
import re
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.core.cache import cache
from django.db import connection, models, transaction
from django.http import HttpResponse
from django.test import Client
from django.utils import timezone
from hypothesis import HealthCheck, settings

from islands.agent import Capabilities, HostRegistration
from islands.models import (
    Attempt,
    DispatcherKey,
    DrawClock,
    Island,
    Job,
    MaintenanceWindow,
    OutboxMessage,
    StatusChange,
)
from karma.models import KarmaEvent, UptimeSweep
from pairing.models import MobilePairingSession, OpenedSession, PairingCode
from tests.conftest import CAPABILITIES
from tests.islands.conftest import give_job, make_island

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "75")),
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "1000")),
    deadline=None,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The fuzz tests take function-scoped fixtures (the test database and the
# `world` in it) on purpose: building the world once per test keeps the
# examples fast, and each example undoes its own writes (see rolled_back),
# which is what that health check exists to ask for.
EACH_EXAMPLE_ROLLS_BACK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
# The websocket tests commit their fixtures (the consumer reads from another
# thread) and share them across examples, which only read them: a socket
# writes nothing, and each test checks that it did not.
EXAMPLES_ONLY_READ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

OTHER_HOST = "7d444840-9dc0-11d1-b245-5ffdce74fad2"
SUSPENDED_HOST = "suspended-host-0001"
PENDING_HOST = "pending-host-0001"
REDEEMED_HOST = "redeemed-host-0001"
COLLECTED_HOST = "collected-host-0001"
BOB_PHONE_HOST = "bob-phone-host-0001"


@dataclass(repr=False)
class World:
    """Rows every endpoint can act on, in each state worth reaching."""

    alice: User
    bob: User
    island: Island  # Alice's desktop Island, on HOST_ID
    token: str
    bob_island: Island
    bob_token: str
    dispatcher_key: str
    # host_id -> device_secret of a code that is pending, redeemed (token not
    # collected yet) and collected.
    device_secrets: dict[str, str]
    mobile: OpenedSession  # Alice's live /pair/mobile session
    bob_mobile: OpenedSession
    job_ids: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        # Hypothesis prints the test's arguments with each failing example.
        return "<the fuzz world: see tests/fuzz/conftest.py>"


@pytest.fixture
def world(alice: User, bob: User) -> World:
    now = timezone.now()
    island = make_island(alice)
    # Online for a while (until its next heartbeat says otherwise), with room:
    # jobs may be placed on it.
    Island.objects.filter(pk=island.pk).update(
        status=Island.Status.ONLINE, offline_after=now + timedelta(minutes=10), capacity=64
    )
    bob_island = make_island(bob, host_id=OTHER_HOST)
    make_island(alice, host_id=SUSPENDED_HOST, suspended_at=now)
    Island.objects.create(owner=bob, host_id=BOB_PHONE_HOST, kind=Island.Kind.MOBILE, device_model="Pixel 8")
    _, dispatcher_key = DispatcherKey.objects.issue("fuzz dispatcher")

    lease = timedelta(minutes=30)
    for job_id, state in [("job-0001", None), ("job-0002", "started"), ("job-0003", "succeeded")]:
        give_job(island=island, job_id=job_id, workload="llm-chat", credits=Decimal("2.5"), lease=lease)
        if state:
            Job.objects.apply_status(island, job_id, state)
    give_job(island=bob_island, job_id="job-bob", workload="llm-chat", credits=Decimal(1), lease=lease)

    device_secrets = {}
    for host_id in (PENDING_HOST, REDEEMED_HOST, COLLECTED_HOST):
        issued = PairingCode.objects.request(
            HostRegistration(host_id, msgspec.convert(CAPABILITIES, Capabilities), "0.5.0"),
            channel=PairingCode.Channel.HTTP,
            ip="203.0.113.7",
        )
        device_secrets[host_id] = issued.device_secret
        if host_id != PENDING_HOST:
            issued.row.redeem(alice)
        if host_id == COLLECTED_HOST:
            PairingCode.objects.poll(host_id, issued.device_secret)
            PairingCode.objects.filter(pk=issued.row.pk).update(last_polled_at=None)

    return World(
        alice=alice,
        bob=bob,
        island=island,
        token=island.issue_token(),
        bob_island=bob_island,
        bob_token=bob_island.issue_token(),
        dispatcher_key=dispatcher_key,
        device_secrets=device_secrets,
        mobile=MobilePairingSession.objects.open(alice),
        bob_mobile=MobilePairingSession.objects.open(bob),
        job_ids=["job-0001", "job-0002", "job-0003", "job-bob"],
    )


# --- Snapshots: what the database holds ----------------------------------------------

# Every table a request could write to, and the sessions table for good measure.
WATCHED_MODELS: list[type[models.Model]] = [
    User,
    Session,
    PairingCode,
    MobilePairingSession,
    Island,
    StatusChange,
    Job,
    Attempt,
    OutboxMessage,
    DrawClock,
    DispatcherKey,
    KarmaEvent,
    UptimeSweep,
    MaintenanceWindow,
]

type Snapshot = dict[type[models.Model], dict[Any, dict[str, Any]]]


def snapshot() -> Snapshot:
    """Every row of the watched tables, as the database returns them, by primary key.

    Plain SQL: the ORM's per-row work cost more than the request under test.
    """
    taken: Snapshot = {}
    with connection.cursor() as cursor:
        for model in WATCHED_MODELS:
            meta = model._meta
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(meta.db_table)}")  # noqa: S608
            names = [column[0] for column in cursor.description]
            # SQLite returns UUIDs as hex strings; make them UUIDs, as on PostgreSQL.
            uuids = {
                column for column, target in _columns(model).items() if isinstance(target, models.UUIDField)
            }
            rows = (
                {
                    name: uuid.UUID(value) if name in uuids and isinstance(value, str) else value
                    for name, value in zip(names, row, strict=True)
                }
                for row in cursor.fetchall()
            )
            taken[model] = {row[meta.pk.column]: row for row in rows}
    return taken


def _columns(model: type[models.Model]) -> dict[str, models.Field[Any, Any]]:
    """Each column of the model's table and the field its values are of (a foreign key's target)."""
    found: dict[str, models.Field[Any, Any]] = {}
    for column in model._meta.concrete_fields:
        target = column.target_field if isinstance(column, models.ForeignKey) else column
        found[column.column or column.attname] = target
    return found


@dataclass
class TableChanges:
    added: list[dict[str, Any]] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    # pk -> the names of the fields that changed
    changed: dict[Any, set[str]] = field(default_factory=dict)


def changes(before: Snapshot, after: Snapshot) -> dict[type[models.Model], TableChanges]:
    """The tables that differ, and how; empty when nothing was written."""
    found: dict[type[models.Model], TableChanges] = {}
    for model in WATCHED_MODELS:
        old, new = before[model], after[model]
        table = TableChanges(
            added=[row for pk, row in new.items() if pk not in old],
            removed=[row for pk, row in old.items() if pk not in new],
            changed={
                pk: {name for name, value in row.items() if old[pk][name] != value}
                for pk, row in new.items()
                if pk in old and old[pk] != row
            },
        )
        if table.added or table.removed or table.changed:
            found[model] = table
    return found


def describe(found: dict[type[models.Model], TableChanges]) -> str:
    return "; ".join(
        f"{model.__name__}: {len(table.added)} added, {len(table.removed)} removed, "
        f"changed {sorted(sorted(names) for names in table.changed.values())}"
        for model, table in found.items()
    )


@contextmanager
def rolled_back() -> Iterator[None]:
    """Run one example in a savepoint that is rolled back, with no rate-limit counters."""
    cache.clear()
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


# --- What the client sees ---------------------------------------------------------------

# Signs of a Python exception or a server error page in a response body.
LEAKS = re.compile(
    r"Traceback \(most recent call last\)|File \"/|\b[A-Z][A-Za-z]*(Error|Exception)\b"
    r"|site-packages|psycopg|sqlite3|(?i:<html|<!doctype)"
)


def failure(response: HttpResponse) -> str:
    """The server's own traceback when the view raised, for the assertion message."""
    exc_info = getattr(response, "exc_info", None)
    if exc_info:
        return "".join(traceback.format_exception(*exc_info))
    return response.content[:500].decode(errors="replace")


def client_view(response: HttpResponse) -> dict[str, Any]:
    """Check what every API answer must be, and return its JSON.

    No 5xx; always a JSON object; `"success": false` and a non-empty error
    with every 4xx; nothing that looks like a traceback.
    """
    status = response.status_code
    assert status < 500, f"{status} from the server:\n{failure(response)}"
    assert response["Content-Type"] == "application/json", (
        status,
        response["Content-Type"],
        failure(response),
    )
    payload = json.loads(response.content)
    assert isinstance(payload, dict), payload
    assert not LEAKS.search(response.content.decode()), response.content
    if status >= 400:
        assert payload["success"] is False, payload
        assert isinstance(payload["error"], str) and payload["error"].strip(), payload
    else:
        assert payload.get("success", True) is True, payload
    return payload


def send(
    method: str,
    path: str,
    body: bytes,
    authorization: str | None = None,
    content_type: str = "application/json",
) -> Any:
    """The test client's response; `exc_info` on it holds what the view raised, if it did."""
    client = Client(raise_request_exception=False)
    headers = {"Authorization": authorization} if authorization is not None else {}
    return client.generic(method, path, body, content_type=content_type, headers=headers)
