"""How senders take, hand back and settle outbox messages (OutboxMessageManager), without NATS.

These run on SQLite and on PostgreSQL; the race needs PostgreSQL's row locks.
"""

import functools
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from islands.models import Island, Job, OutboxMessage
from tests.bridge.test_outbox import assign_row, nats_island, submit
from tests.conftest import race

Kind = OutboxMessage.Kind


@pytest.fixture
def island(alice):
    island = nats_island(alice)
    Island.objects.filter(pk=island.pk).update(capacity=1000)
    return island


def claim(seconds: float = 30, limit: int = 100, now=None):
    now = now or timezone.now()
    return OutboxMessage.objects.claim(now, now + timedelta(seconds=seconds), limit)


def test_a_claim_takes_due_messages_oldest_first_and_holds_them_until_it_passes(island):
    jobs = [submit(f"job-{n}") for n in range(3)]
    now = timezone.now()
    first = claim(limit=2, now=now)
    assert [m.msg_id for m in first] == ["job-0:1", "job-1:1"]
    assert [m.tries for m in first] == [1, 1]
    # Another sender meanwhile gets only what is left.
    assert [m.msg_id for m in claim(now=now)] == ["job-2:1"]
    assert claim(now=now) == []
    # Once the claims pass (their senders died), another takes the messages over.
    later = now + timedelta(seconds=31)
    assert [m.msg_id for m in claim(now=later)] == ["job-0:1", "job-1:1", "job-2:1"]
    assert assign_row(jobs[0]).tries == 2


def test_a_message_is_not_taken_before_it_is_due_nor_after_it_is_sent(island):
    job = submit("job-later")
    now = timezone.now()
    [message] = claim(now=now)
    OutboxMessage.objects.release(message, now, tried=True, delay=timedelta(seconds=10), error="boom")
    assert claim(now=now + timedelta(seconds=9)) == []
    [again] = claim(now=now + timedelta(seconds=11))
    assert (again.tries, again.last_error) == (2, "boom")
    assert OutboxMessage.objects.mark_sent(again, now, stream_seq=7)
    assert claim(now=now + timedelta(hours=1)) == []
    row = assign_row(job)
    assert (row.stream_seq, row.claimed_until, row.last_error) == (7, None, "")


def test_a_message_handed_back_unsent_gives_its_claim_back(island):
    job = submit("job-handed-back")
    now = timezone.now()
    [message] = claim(now=now)
    OutboxMessage.objects.release(message, now, tried=False)
    assert (assign_row(job).tries, assign_row(job).claimed_until) == (0, None)
    # Never tried, so the cancel withdraws it in place: nothing to delete.
    Job.objects.cancel("job-handed-back")
    assert assign_row(job).withdrawn_at is not None
    assert not OutboxMessage.objects.filter(kind=Kind.DELETE).exists()


@pytest.mark.parametrize("how", ["claimed now", "tried and failed", "claim passed", "sent"])
def test_an_assign_job_a_sender_may_have_published_gets_a_delete_when_its_job_moves_on(island, how):
    job = submit("job-moving-on")
    now = timezone.now()
    [message] = claim(seconds=1, now=now)
    if how == "tried and failed":
        OutboxMessage.objects.release(message, now, tried=True, error="timeout")
    elif how == "claim passed":
        OutboxMessage.objects.filter(pk=message.pk).update(claimed_until=now - timedelta(seconds=5))
    elif how == "sent":
        OutboxMessage.objects.mark_sent(message, now, stream_seq=3)
    Job.objects.cancel("job-moving-on")
    assert assign_row(job).withdrawn_at is None
    delete = OutboxMessage.objects.get(kind=Kind.DELETE)
    assert (delete.target_id, delete.msg_id) == (message.pk, "job-moving-on:1:delete")
    # And that AssignJob is never claimed again; the cancel and the DELETE are.
    assert {m.kind for m in claim(now=now + timedelta(minutes=1))} == {Kind.CANCEL, Kind.DELETE}


def test_settling_a_delete_says_where_its_assign_job_stands(island):
    job = submit("job-settle")
    now = timezone.now()
    [message] = claim(seconds=10, now=now)
    Job.objects.cancel("job-settle")
    delete = OutboxMessage.objects.get(kind=Kind.DELETE)
    settle = OutboxMessage.objects.settle_target

    assert settle(delete, now)[0] == "in_flight"  # its sender holds it
    OutboxMessage.objects.release(message, now, tried=True, error="timeout")
    state, target = settle(delete, now)
    assert state == "unknown"  # tried: it may be in the stream; and nobody tries it again
    assert target.msg_id == "job-settle:1"
    assert assign_row(job).withdrawn_at is not None
    assert settle(delete, now)[0] == "unknown"
    # Its sender's late answer finds it withdrawn: it takes back what it published.
    assert OutboxMessage.objects.mark_sent(message, now, stream_seq=9) is False


def test_settling_a_delete_of_a_sent_or_a_never_sent_assign_job(island):
    sent_job, unsent_job = submit("job-sent"), submit("job-unsent")
    now = timezone.now()
    first, second = claim(now=now)
    OutboxMessage.objects.mark_sent(first, now, stream_seq=41)
    OutboxMessage.objects.release(second, now, tried=False)
    Job.objects.cancel("job-sent")
    Job.objects.cancel("job-unsent")
    [delete] = OutboxMessage.objects.filter(kind=Kind.DELETE)
    state, target = OutboxMessage.objects.settle_target(delete, now)
    assert (state, target.stream_seq) == ("sent", 41)
    # The never-tried one was withdrawn in place: no DELETE at all.
    assert assign_row(unsent_job).withdrawn_at is not None
    assert assign_row(sent_job).withdrawn_at is None


def test_giving_up_stops_a_message_for_good(island):
    job = submit("job-given-up")
    now = timezone.now()
    [message] = claim(now=now)
    OutboxMessage.objects.give_up(message, now, "not sent within 1 hour")
    row = assign_row(job)
    assert (row.withdrawn_at, row.claimed_until, row.last_error) == (
        now,
        None,
        "gave up: not sent within 1 hour",
    )
    assert claim(now=now + timedelta(days=1)) == []


@pytest.mark.usefixtures("postgres")
def test_concurrent_senders_claim_each_message_exactly_once(island, transactional_db):
    for n in range(240):
        submit(f"job-race-{n:03d}")
    taken: dict[int, list[int]] = {}
    lock = threading.Lock()

    def sender(number: int) -> None:
        mine: list[int] = []
        while batch := claim(limit=7):
            mine += [message.pk for message in batch]
        with lock:
            taken[number] = mine

    race([functools.partial(sender, n) for n in range(8)])
    claimed = [pk for pks in taken.values() for pk in pks]
    assert len(claimed) == len(set(claimed)) == 240
    assert sum(1 for pks in taken.values() if pks) > 1  # they did share the work
    assert set(OutboxMessage.objects.values_list("tries", flat=True)) == {1}
    assert connection.vendor == "postgresql"
