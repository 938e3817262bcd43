"""Builders for karma tests: an Island, its heartbeats, its jobs, and the watcher's step."""

from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import User

from archipelag.management.commands.watch_islands import Command as Watcher
from islands.models import Island, Job
from karma.models import KarmaEvent
from tests.islands.conftest import T0, beat, give_job, make_island

__all__ = ["T0", "beat", "make_island"]


@pytest.fixture
def island(alice: User) -> Island:
    """Alice's desktop Island, paired, with no heartbeat yet and the starting karma."""
    return make_island(alice)


def sign_off(island: Island, at: datetime) -> None:
    beat(island, at, "offline")


def beat_through(island: Island, start: datetime, end: datetime, every: timedelta) -> None:
    """Heartbeats from `start` to `end` inclusive, `every` apart."""
    at = start
    while at <= end:
        beat(island, at)
        at += every


def watch(now: datetime):
    """One step of the watcher at `now`, as `watch_islands` runs it."""
    return Watcher().handle_one(now)


def give(island: Island, job_id: str, at: datetime, lease: timedelta = timedelta(minutes=5)) -> Job:
    return give_job(
        island=island, job_id=job_id, workload="llm-chat", credits=Decimal(1), lease=lease, now=at
    )


def run_job(island: Island, job_id: str, at: datetime, state: str, start_after: timedelta | None) -> Job:
    """A job given at `at`, started `start_after` later (or never), ending in `state` 30 s after that."""
    give(island, job_id, at)
    if start_after is not None:
        Job.objects.apply_status(island, job_id, "started", now=at + start_after)
    Job.objects.apply_status(
        island, job_id, state, now=at + (start_after or timedelta(0)) + timedelta(seconds=30)
    )
    return Job.objects.get(job_id=job_id)


def karma(island: Island) -> Decimal:
    island.refresh_from_db(fields=["karma"])
    return island.karma


def events(island: Island) -> list[KarmaEvent]:
    """The Island's events in the order they were applied."""
    return list(KarmaEvent.objects.filter(island=island).order_by("id"))


def assert_ledger_adds_up(island: Island) -> None:
    """The score is the running, clamped sum of the events, in the order applied."""
    score = Decimal(50)
    for event in events(island):
        assert event.delta == min(Decimal(100), max(Decimal(0), score + event.requested_delta)) - score
        score += event.delta
        assert event.score_after == score
    assert karma(island) == score
