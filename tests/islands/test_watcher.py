"""`manage.py watch_islands`: silent Islands are recorded offline, exactly once."""

import itertools
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import InterfaceError, OperationalError

from archipelag.management.commands.watch_islands import Command, Step
from islands.agent import EnhancedHeartbeat
from islands.models import Beat, Island, StatusChange, hash_token
from tests.conftest import race
from tests.islands.conftest import T0, beat, make_island

Status = Island.Status
Reason = StatusChange.Reason


def step(now):
    return Command().handle_one(now)


def test_a_silent_island_is_recorded_offline_at_its_deadline(island):
    beat(island, T0)
    assert step(T0 + timedelta(seconds=44.9)).silences == 0
    island.refresh_from_db()
    assert island.status == Status.ONLINE

    assert step(T0 + timedelta(seconds=45.1)).silences == 1
    island.refresh_from_db()
    assert island.status == Status.OFFLINE
    change = island.status_changes.latest("at")
    assert (change.from_status, change.to_status, change.reason) == (
        Status.ONLINE,
        Status.OFFLINE,
        Reason.SILENCE,
    )
    # Dated when the deadline passed, not when the watcher noticed.
    assert change.at == T0 + timedelta(seconds=45)


def test_a_second_step_records_nothing_more(island):
    beat(island, T0)
    step(T0 + timedelta(minutes=1))
    assert step(T0 + timedelta(minutes=2)).silences == 0
    assert island.status_changes.filter(reason=Reason.SILENCE).count() == 1


def test_signed_off_and_never_seen_islands_are_left_alone(island, alice):
    beat(island, T0)
    beat(island, T0 + timedelta(seconds=1), "offline")
    make_island(alice, "quiet-host-0001")
    assert step(T0 + timedelta(hours=1)).silences == 0
    assert StatusChange.objects.filter(reason=Reason.SILENCE).count() == 0


def test_a_heartbeat_in_time_keeps_the_island_online(island):
    beat(island, T0)
    beat(island, T0 + timedelta(seconds=40))
    assert step(T0 + timedelta(seconds=60)).silences == 0
    assert step(T0 + timedelta(seconds=85.1)).silences == 1


def test_the_watcher_uses_the_threshold_setting(island, settings):
    settings.ISLAND_OFFLINE_AFTER = 120
    beat(island, T0)
    assert step(T0 + timedelta(seconds=119.9)).silences == 0
    assert step(T0 + timedelta(seconds=120.1)).silences == 1


def history(island):
    return [(c.from_status, c.to_status, c.reason, c.at) for c in island.status_changes.order_by("at", "pk")]


def test_removing_an_online_island_records_it_signed_off_and_the_watcher_leaves_it(island):
    beat(island, T0)
    island.remove(T0 + timedelta(seconds=10))
    assert step(T0 + timedelta(minutes=1)).silences == 0
    assert history(island) == [
        (Status.OFFLINE, Status.ONLINE, Reason.FIRST_HEARTBEAT, T0),
        (Status.ONLINE, Status.SIGNED_OFF, Reason.REMOVED, T0 + timedelta(seconds=10)),
    ]


def test_removing_an_island_past_its_deadline_records_the_silence_first(island):
    beat(island, T0)
    island.remove(T0 + timedelta(minutes=5))
    island.remove(T0 + timedelta(minutes=6))  # once removed, removing again records nothing
    assert history(island) == [
        (Status.OFFLINE, Status.ONLINE, Reason.FIRST_HEARTBEAT, T0),
        (Status.ONLINE, Status.OFFLINE, Reason.SILENCE, T0 + timedelta(seconds=45)),
        (Status.OFFLINE, Status.SIGNED_OFF, Reason.REMOVED, T0 + timedelta(minutes=5)),
    ]
    assert Island.objects.get(pk=island.pk).removed_at == T0 + timedelta(minutes=5)


def test_the_command_can_run_one_step(island):
    beat(island, T0 - timedelta(minutes=5))
    call_command("watch_islands", "--once")
    island.refresh_from_db()
    assert island.status == Status.OFFLINE


def test_the_loop_outlives_database_errors_of_either_kind(monkeypatch, caplog):
    # A restarted database raises OperationalError; a connection closed under
    # the watcher raises InterfaceError, which is no DatabaseError in DB-API.
    failures = [OperationalError("server closed the connection"), InterfaceError("connection already closed")]
    steps = []

    def handle_one(self, now=None):
        steps.append(now)
        if failures:
            raise failures.pop(0)
        self.stopping = True
        return Step(silences=0, timeouts=0)

    monkeypatch.setattr(Command, "handle_one", handle_one)
    call_command("watch_islands", "--interval", "0")
    assert len(steps) == 3
    logged = [record.getMessage() for record in caplog.records]
    assert logged.count("event=watch_failed; retrying after the interval") == 2


# --- Real concurrency, on PostgreSQL ----------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_watchers_running_at_once_record_each_silence_once(postgres, alice):
    islands = [make_island(alice, f"host-{n:08d}") for n in range(60)]
    beat(islands, T0)
    now = T0 + timedelta(minutes=1)

    race([lambda: step(now) for _ in range(6)])

    assert StatusChange.objects.filter(reason=Reason.SILENCE).count() == 60
    assert Island.objects.filter(status=Status.OFFLINE).count() == 60


@pytest.mark.django_db(transaction=True)
def test_heartbeats_racing_watchers_leave_a_consistent_history(postgres, alice):
    """Whoever wins each race, every recorded transition starts where the last one ended."""
    islands = [make_island(alice, f"host-{n:08d}") for n in range(40)]
    tokens = [island.issue_token() for island in islands]
    beat(islands, T0)
    late = T0 + timedelta(seconds=50)

    def heartbeats():
        # One at a time, named by host id, as the NATS bridge names them.
        for island in islands:
            beat(island, late)

    def batch():
        # All at once, named by token, as the HTTP group commit names them.
        online = EnhancedHeartbeat(status="online")
        Island.objects.record_heartbeats(
            [Beat(online, late, token_hash=hash_token(token)) for token in tokens]
        )

    race([lambda: step(late), heartbeats, lambda: step(late), batch, lambda: step(late)])

    for island in Island.objects.all():
        history = list(island.status_changes.order_by("at", "pk"))
        assert [change.reason for change in history] == [
            Reason.FIRST_HEARTBEAT,
            Reason.SILENCE,
            Reason.BACK_ONLINE,
        ]
        for before, after in itertools.pairwise(history):
            assert before.to_status == after.from_status
        assert history[1].at == T0 + timedelta(seconds=45)
        assert history[-1].to_status == island.status == Status.ONLINE
