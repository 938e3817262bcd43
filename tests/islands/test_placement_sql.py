"""PostgreSQL's placement statements: the walk from compiled SQL and the one-statement placement.

On PostgreSQL a drawn placement is two statements (Island.objects.walk_first,
then JobManager._place_at_once's CTE) instead of the ORM's dozen; these tests
hold both to what the ORM path reads and writes.
"""

import random
import select
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from django.db import connection, transaction
from django.forms.models import model_to_dict

from islands.models import (
    OUTBOX_CHANNEL,
    Attempt,
    DrawClock,
    DuplicateJob,
    Island,
    Job,
    JobSpec,
    OutboxMessage,
)
from tests.islands.conftest import make_island
from tests.islands.test_placement import NOW, online, spec, with_karma

pytestmark = pytest.mark.usefixtures("postgres")

JOB_SHAPES = [
    {},
    {"runtime": "wasm"},
    {"min_vram_mb": 16384},
    {"region": "eu-west"},
    {"platform": "desktop"},
    {"runtime": "coreml", "platform": "ios"},
    {"budget": Decimal("1.2"), "workload": "llm-chat"},
    {"min_vram_mb": 8000, "region": "EU-WEST", "budget": Decimal("3")},
]


@pytest.fixture
def mixed_fleet(alice, bob) -> list[Island]:
    """Islands that differ in every way a rule looks at."""
    islands = [
        online(make_island(alice, "big-eu-000001", gpu_vram_mb=24576, region="eu-west")),
        online(make_island(alice, "small-eu-00001", gpu_vram_mb=8192, region="eu-west")),
        online(make_island(bob, "us-host-000001", region="us-east"), asking_prices={"llm-chat": "1.5"}),
        online(make_island(bob, "cheap-0000001"), asking_prices={"_default": "0.25"}),
        online(
            make_island(alice, "iphone-00001", kind=Island.Kind.MOBILE, platform="ios", runtime="coreml"),
        ),
        with_karma(online(make_island(bob, "low-karma-0001")), "10"),
        make_island(alice, "never-online-01"),
    ]
    for n in range(20):
        islands.append(with_karma(online(make_island(alice, f"bulk-{n:04d}")), str(30 + 3 * n)))
    Island.objects.refresh_turns(random.Random(1))
    return islands


@pytest.mark.parametrize("shape", JOB_SHAPES, ids=lambda shape: ",".join(shape) or "plain")
def test_the_compiled_walk_reads_what_the_orm_walk_reads(mixed_fleet, shape):
    job = spec(**shape)
    passed = [mixed_fleet[0].pk, mixed_fleet[7].pk]
    for skipped in ([], passed):
        rows, clock = Island.objects.walk_first(job, NOW, skipped)
        orm = Island.objects._read_walk(job, NOW, skipped, None, 0)
        assert rows == orm
        assert clock == DrawClock.now()
    # Not vacuous: every shape finds somebody.
    assert rows


def test_the_compiled_walk_follows_a_changed_default_ask(mixed_fleet, settings):
    job = spec(budget=Decimal("2"))
    assert len(Island.objects.walk_first(job, NOW, [])[0]) == 16
    settings.DEFAULT_ASK = Decimal("5")
    after = Island.objects.walk_first(job, NOW, [])[0]
    assert after == Island.objects._read_walk(job, NOW, [], None, 0)
    # Only Islands with a price of their own still fit a budget of 2.
    assert {row["host_id"] for row in after} == {"us-host-000001", "cheap-0000001"}


def comparable(row: Any, *ignore: str) -> dict[str, Any]:
    fields = model_to_dict(row)
    for name in ("id", "job", *ignore):
        fields.pop(name, None)
    return fields


def test_one_statement_writes_the_rows_the_orm_path_writes(alice):
    """The same job on the same NATS Island, placed both ways: the same job, attempt and AssignJob."""
    island = online(make_island(alice, "nats-host-0001", transport=Island.Transport.NATS))
    job_spec = JobSpec(
        job_id="one-statement",
        workload="llm-chat",
        lease=timedelta(minutes=5),
        budget=Decimal("2.5"),
        input={"prompt": "Hello", "nested": [1, 2.5, None]},
        artefacts={"container_image": "registry.example.com/llm-chat:latest"},
        region=None,
        min_vram_mb=1024,
    )
    placed = Job.objects.submit(job_spec, now=NOW, rng=random.Random(1))
    # What the view answers from, without another query.
    assert placed.island.host_id == "nats-host-0001"
    with transaction.atomic():
        seat = Island.objects.draw(
            JobSpec(**{**job_spec.__dict__, "job_id": "orm-path"}), NOW, random.Random(1)
        ).seat
        assert seat is not None
        recorded = Job.objects._record(
            JobSpec(**{**job_spec.__dict__, "job_id": "orm-path"}), seat, NOW, None
        )
    one, orm = Job.objects.get(job_id="one-statement"), Job.objects.get(pk=recorded.pk)
    assert comparable(one, "job_id") == comparable(orm, "job_id")
    assert one.island_id == island.pk and one.credits == Decimal("1.0000")
    attempts = [Attempt.objects.get(job=job) for job in (one, orm)]
    assert comparable(attempts[0], "assign_message") == comparable(attempts[1], "assign_message")
    messages = [OutboxMessage.objects.get(job=job) for job in (one, orm)]
    assert [attempt.assign_message_id for attempt in attempts] == [message.pk for message in messages]
    assert messages[0].msg_id == "one-statement:1"
    assert messages[0].payload.replace("one-statement", "orm-path") == messages[1].payload
    assert comparable(messages[0], "msg_id", "payload", "created_at", "available_at") == comparable(
        messages[1], "msg_id", "payload", "created_at", "available_at"
    )
    island.refresh_from_db()
    assert island.jobs_running == 2


def test_a_duplicate_in_one_statement_writes_nothing(alice):
    island = online(make_island(alice, "dup-host-0001"))
    first = Job.objects.submit(spec("twice"), now=NOW)
    with pytest.raises(DuplicateJob) as refused:
        Job.objects.submit(spec("twice"), now=NOW)
    assert refused.value.existing.pk == first.pk
    island.refresh_from_db()
    assert island.jobs_running == 1
    assert Attempt.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_one_statement_wakes_the_senders_when_it_commits(alice):
    """A NOTIFY on the outbox channel reaches a LISTENer: once for a NATS Island, never for HTTP."""
    online(make_island(alice, "nats-notify-01", transport=Island.Transport.NATS, id=uuid.UUID(int=1)))
    params = connection.get_connection_params()
    params.pop("pool", None)
    with psycopg.connect(**params, autocommit=True) as listener:
        listener.execute(f"LISTEN {OUTBOX_CHANNEL}")
        Job.objects.submit(spec("notified"), now=NOW)
        assert select.select([listener.fileno()], [], [], 5)[0], "no NOTIFY within 5 s"
        notices = list(listener.notifies(timeout=0.5, stop_after=5))
        assert [notice.channel for notice in notices] == [OUTBOX_CHANNEL]
        Island.objects.filter(host_id="nats-notify-01").update(transport=Island.Transport.HTTP)
        Job.objects.submit(spec("quiet"), now=NOW)
        assert list(listener.notifies(timeout=0.5)) == []
    assert Job.objects.filter(job_id__in=["notified", "quiet"]).count() == 2
