"""Heartbeats arriving together share one transaction, and each still waits for it."""

import asyncio
import re
import threading
import time
from datetime import timedelta
from typing import Any

import msgspec
import pytest
from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.db.models.signals import post_init, pre_init
from django.test import Client
from django.test.utils import CaptureQueriesContext

from archipelag.secrets import hash_secret
from islands import views
from islands.agent import EnhancedHeartbeat
from islands.groupcommit import GroupCommit, GroupCommitFailed, _Pending
from islands.models import Beat, HeartbeatOutcome, Island, StatusChange
from tests.islands.conftest import MINIMAL_HEARTBEAT, T0, make_island, post_json

Outcome = HeartbeatOutcome
HEARTBEAT = "/api/v1/islands/heartbeat"


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def queued(commits: GroupCommit[Any, Any]) -> int:
    """How many items wait behind the batch being written. The queue is private: tests peek."""
    with commits._lock:
        return len(commits._queue)


def in_threads(function, arguments):
    """Run function(argument) in one thread each; return results (or exceptions) in order."""
    results: list[Any] = [None] * len(arguments)

    def run(index, argument):
        try:
            results[index] = function(argument)
        except Exception as exc:
            results[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(n, a)) for n, a in enumerate(arguments)]
    for thread in threads:
        thread.start()
    return threads, results


class GatedWriter:
    """A batch writer whose first batch waits until the test opens the gate."""

    def __init__(self, fail_batch=None):
        self.batches = []
        self.gate = threading.Event()
        self.fail_batch = fail_batch

    def __call__(self, items):
        self.batches.append(list(items))
        if len(self.batches) == 1:
            assert self.gate.wait(10)
        if len(self.batches) == self.fail_batch:
            raise RuntimeError("database went away")
        return [item * 10 for item in items]


# --- The mechanism -------------------------------------------------------------


def test_a_lone_item_is_written_at_once_in_a_batch_of_its_own():
    batches: list[list[int]] = []

    def write(items):
        batches.append(list(items))
        return [f"done {item}" for item in items]

    commits: GroupCommit[int, str] = GroupCommit(write)
    assert commits.submit(1) == "done 1"
    assert commits.submit(2) == "done 2"
    assert batches == [[1], [2]]


def test_items_arriving_during_a_write_share_the_next_batch_and_get_their_own_results():
    writer = GatedWriter()
    commits = GroupCommit(writer)
    first, first_result = in_threads(commits.submit, [1])
    wait_until(lambda: len(writer.batches) == 1)
    others, results = in_threads(commits.submit, list(range(2, 12)))
    wait_until(lambda: queued(commits) == 10)
    writer.gate.set()
    for thread in first + others:
        thread.join(10)
    assert first_result == [10]
    assert results == [n * 10 for n in range(2, 12)]
    assert [sorted(batch) for batch in writer.batches] == [[1], list(range(2, 12))]
    assert queued(commits) == 0


def test_a_request_waits_for_the_commit_of_its_own_batch():
    writer = GatedWriter()
    commits = GroupCommit(writer)
    threads, results = in_threads(commits.submit, [1])
    wait_until(lambda: len(writer.batches) == 1)
    time.sleep(0.05)
    assert results == [None] and threads[0].is_alive()
    writer.gate.set()
    threads[0].join(10)
    assert results == [10]


def test_a_failed_batch_fails_every_request_in_it_and_the_next_batch_still_runs():
    writer = GatedWriter(fail_batch=2)
    commits = GroupCommit(writer)
    first, _ = in_threads(commits.submit, [1])
    wait_until(lambda: len(writer.batches) == 1)
    doomed, results = in_threads(commits.submit, [2, 3, 4])
    wait_until(lambda: queued(commits) == 3)
    writer.gate.set()
    for thread in first + doomed:
        thread.join(10)
    # The leader of the failed batch sees the error itself; the others are told their batch failed.
    assert sum(isinstance(result, RuntimeError) for result in results) == 1, results
    assert sum(isinstance(result, GroupCommitFailed) for result in results) == 2, results
    assert commits.submit(5) == 50


def test_a_queue_longer_than_a_batch_is_written_in_several():
    writer = GatedWriter()
    commits = GroupCommit(writer, max_batch=4)
    first, _ = in_threads(commits.submit, [0])
    wait_until(lambda: len(writer.batches) == 1)
    others, results = in_threads(commits.submit, list(range(1, 11)))
    wait_until(lambda: queued(commits) == 10)
    writer.gate.set()
    for thread in first + others:
        thread.join(10)
    assert results == [n * 10 for n in range(1, 11)]
    assert [len(batch) for batch in writer.batches] == [1, 4, 4, 2]


# --- The same from async code: waiting in the event loop ---------------------------


def test_async_items_arriving_during_a_write_share_the_next_batch_in_one_event_loop():
    writer = GatedWriter()
    commits = GroupCommit(writer)
    threads_before = threading.active_count()

    async def scenario():
        first = asyncio.ensure_future(commits.asubmit(1))
        await asyncio.to_thread(wait_until, lambda: len(writer.batches) == 1)
        others = [asyncio.ensure_future(commits.asubmit(n)) for n in range(2, 12)]
        await asyncio.to_thread(wait_until, lambda: queued(commits) == 10)
        # The ten waiting hold no thread (the loop's helpers and the leader's write take a few).
        assert threading.active_count() - threads_before < 5
        writer.gate.set()
        return await first, await asyncio.gather(*others)

    first, results = asyncio.run(scenario())
    assert first == 10
    assert results == [n * 10 for n in range(2, 12)]
    assert [sorted(batch) for batch in writer.batches] == [[1], list(range(2, 12))]
    assert queued(commits) == 0


def test_a_sync_and_an_async_request_share_one_queue():
    writer = GatedWriter()
    commits = GroupCommit(writer)
    first, first_result = in_threads(commits.submit, [1])
    wait_until(lambda: len(writer.batches) == 1)
    others, results = in_threads(lambda n: asyncio.run(commits.asubmit(n)), [2, 3])
    wait_until(lambda: queued(commits) == 2)
    writer.gate.set()
    for thread in first + others:
        thread.join(10)
    assert (first_result, results) == ([10], [20, 30])
    assert [sorted(batch) for batch in writer.batches] == [[1], [2, 3]]


def test_a_waiting_request_that_goes_away_is_dropped_and_the_queue_moves_on():
    writer = GatedWriter()
    commits = GroupCommit(writer)

    async def scenario():
        first = asyncio.ensure_future(commits.asubmit(1))
        await asyncio.to_thread(wait_until, lambda: len(writer.batches) == 1)
        gone = asyncio.ensure_future(commits.asubmit(2))
        stays = asyncio.ensure_future(commits.asubmit(3))
        await asyncio.to_thread(wait_until, lambda: queued(commits) == 2)
        gone.cancel()  # its client hung up while it waited
        await asyncio.sleep(0)
        writer.gate.set()
        return await first, await stays, await asyncio.gather(gone, return_exceptions=True)

    first, stays, (gone,) = asyncio.run(scenario())
    assert (first, stays) == (10, 30)
    assert isinstance(gone, asyncio.CancelledError)
    assert writer.batches == [[1], [3]]
    assert not commits._writing and queued(commits) == 0


def test_a_request_made_leader_that_goes_away_passes_the_lead_on():
    commits: GroupCommit[int, int] = GroupCommit(lambda items: list(items))

    async def scenario():
        loop = asyncio.get_running_loop()
        promoted: _Pending[int, int] = _Pending(1, loop)
        next_one: _Pending[int, int] = _Pending(2, loop)
        # The state a leader leaves when it has just made `promoted` the next one.
        commits._writing = True
        commits._queue = [promoted, next_one]
        promoted.lead = True
        commits._abandon(promoted)
        assert next_one.future is not None
        await asyncio.wait_for(next_one.future, 1)
        return next_one.lead

    assert asyncio.run(scenario()) is True
    assert commits._queue and commits._queue[0].item == 2


# --- The heartbeat batch: the token check folded into the write ---------------------


def statements(queries):
    """The kinds of statements run, leaving out transaction bookkeeping.

    Django logs an executemany() as one entry, "<n> times: <sql>".
    """
    kinds = [re.sub(r"^\d+ times: ", "", query["sql"]).split()[0] for query in queries.captured_queries]
    return [kind for kind in kinds if kind in {"SELECT", "UPDATE", "INSERT", "DELETE"}]


def heartbeat(payload=None):
    return msgspec.convert(payload or {"status": "online"}, EnhancedHeartbeat)


def by_token(token, heartbeat, at):
    return Beat(heartbeat, at, token_hash=hash_secret(token))


def test_one_batch_sorts_out_good_revoked_expired_and_misaddressed_beats(alice, bob):
    good = make_island(alice, "good-host-0001")
    good_token = good.issue_token()
    removed = make_island(alice, "removed-host-01")
    removed_token = removed.issue_token()
    removed.remove()
    phone = make_island(bob, "phone-host-0001", kind=Island.Kind.MOBILE)
    phone_token = phone.issue_token(now=T0 - timedelta(days=31))
    other = make_island(bob, "other-host-0001")
    other_token = other.issue_token()
    batch = [
        by_token(good_token, heartbeat({"host_id": "good-host-0001", "agent_version": "1"}), T0),
        by_token(removed_token, heartbeat(), T0),
        by_token(phone_token, heartbeat(), T0),
        by_token(other_token, heartbeat({"host_id": "good-host-0001"}), T0),
        by_token(good_token, heartbeat({"agent_version": "2"}), T0 + timedelta(seconds=1)),
    ]
    with CaptureQueriesContext(connection) as queries:
        outcomes = Island.objects.record_heartbeats(batch, now=T0)
    assert outcomes == [
        Outcome.STALE,  # the same Island's later beat in the batch wins
        Outcome.UNAUTHORIZED,
        Outcome.UNAUTHORIZED,
        Outcome.WRONG_HOST,
        Outcome.ACCEPTED,
    ]
    good.refresh_from_db()
    assert good.agent_version == "2"  # the latest beat of the Island wins
    assert good.last_heartbeat_at == T0 + timedelta(seconds=1)
    assert Island.objects.filter(last_heartbeat_at__isnull=False).count() == 1
    # (The removed Island's one change is its removal, recorded before the batch.)
    assert list(StatusChange.objects.exclude(island=removed).values_list("island", flat=True)) == [good.pk]
    assert statements(queries) == ["SELECT", "UPDATE", "INSERT"]


def test_a_batch_costs_the_same_for_two_tokens_or_two_hundred(alice):
    def queries_for(count, prefix):
        islands = [make_island(alice, f"{prefix}-{n:08d}") for n in range(count)]
        batch = [by_token(island.issue_token(), heartbeat(), T0) for island in islands]
        with CaptureQueriesContext(connection) as queries:
            outcomes = Island.objects.record_heartbeats(batch, now=T0)
        assert outcomes == [Outcome.ACCEPTED] * count
        return len(queries.captured_queries)

    assert queries_for(2, "small") == queries_for(200, "large")
    assert Island.objects.filter(status=Island.Status.ONLINE).count() == 202


def test_a_row_locked_for_a_batch_is_the_island_from_db_builds(alice):
    """from_row skips Model.__init__: what it builds must behave as a loaded Island."""
    made = make_island(alice, "row-host-000001", name="Attic", region="eu-west")
    token = made.issue_token()
    with transaction.atomic():
        (island,) = Island.objects._lock_for_heartbeats({hash_secret(token)}, set(), T0)
    loaded = Island.objects.get(pk=made.pk)
    assert island == loaded and island.pk == made.pk
    assert (island._state.db, island._state.adding) == ("default", False)
    for name in ("host_id", "name", "token_hash", "kind", "owner_id", "region", "gpu_vram_mb", "karma"):
        assert getattr(island, name) == getattr(loaded, name), name
    assert "metrics" in island.get_deferred_fields()  # replaced by every beat, so not read
    assert island.metrics == loaded.metrics  # and loaded on demand like any deferred field
    assert island.owner == alice
    # Saved as from_db's Island would be: an UPDATE of the fields named, never an INSERT.
    island.region = "us-east"
    island.save(update_fields=["region"])
    assert Island.objects.get(pk=made.pk).region == "us-east"
    assert Island.objects.count() == 1
    # Skipping __init__ is only sound while nothing listens for an Island being built.
    assert not pre_init.has_listeners(Island) and not post_init.has_listeners(Island)


# --- Through HTTP, with real threads on PostgreSQL ------------------------------------


@pytest.mark.django_db(transaction=True)
def test_concurrent_heartbeats_share_a_batch_and_a_revoked_token_in_it_gets_401(postgres, alice, monkeypatch):
    islands = [make_island(alice, f"batch-host-{n:04d}") for n in range(12)]
    tokens = [island.issue_token() for island in islands]
    real_write = Island.objects.record_heartbeats
    gate = threading.Event()
    batches = []

    def gated_write(beats):
        batches.append(len(beats))
        if len(batches) == 1:
            assert gate.wait(10)
        return real_write(beats)

    commits = GroupCommit(gated_write)
    monkeypatch.setattr(views, "heartbeat_commits", commits)

    def send(token):
        return post_json(Client(), HEARTBEAT, MINIMAL_HEARTBEAT | {"host_id": None}, token).status_code

    plug, plug_status = in_threads(send, [tokens[0]])
    wait_until(lambda: len(batches) == 1)
    # Removed while its beat waits in the queue: the batch's token check refuses it.
    islands[5].remove()
    wrong_host = tokens[6]
    threads, statuses = in_threads(send, tokens[1:5] + tokens[7:])
    wrong, wrong_status = in_threads(
        lambda token: post_json(Client(), HEARTBEAT, {"host_id": "batch-host-0000"}, token).status_code,
        [wrong_host],
    )
    revoked, revoked_status = in_threads(send, [tokens[5]])
    wait_until(lambda: queued(commits) == 11)
    gate.set()
    for thread in plug + threads + wrong + revoked:
        thread.join(10)
    assert plug_status == [200]
    assert statuses == [200] * 9
    assert wrong_status == [403]
    assert revoked_status == [401]
    assert batches == [1, 11]
    written = set(Island.objects.filter(last_heartbeat_at__isnull=False).values_list("host_id", flat=True))
    assert written == {island.host_id for n, island in enumerate(islands) if n not in (5, 6)}


def test_a_leader_that_hangs_up_before_its_write_starts_still_writes_and_passes_the_lead():
    """Its client gone while its write waits for the request thread: the queue must not stall.

    Django cancels a view whose client hung up. Were the leader's write
    cancelled before it started, nobody would ever lead again and every
    later heartbeat of the process would wait until its client gave up.
    """
    written: list[list[int]] = []

    def write(items: Any) -> list[int]:
        written.append(list(items))
        return list(items)

    commits: GroupCommit[int, int] = GroupCommit(write)
    busy = threading.Event()

    async def scenario() -> int:
        # Keep the request thread (thread-sensitive executor) busy, so the
        # leader's write is queued behind it and not started yet.
        blocker = asyncio.ensure_future(sync_to_async(busy.wait)())
        await asyncio.sleep(0.1)
        leader = asyncio.ensure_future(commits.asubmit(1))
        await asyncio.sleep(0.1)
        leader.cancel()
        busy.set()
        await blocker
        return await asyncio.wait_for(commits.asubmit(2), timeout=5)

    assert asyncio.run(scenario()) == 2
    # Each written once: together, or the leader's first, as the thread allows.
    assert [item for batch in written for item in batch] == [1, 2]
