"""Builders for Islands that are paired and hold an API token, and their heartbeats."""

import copy
import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import F
from django.test import Client
from django.utils import timezone

from islands.agent import REFERENCE_HEARTBEAT, EnhancedHeartbeat
from islands.models import Beat, HeartbeatOutcome, Island, Job, JobSpec, Seat
from tests.conftest import HOST_ID

# A fixed instant to travel to; tests move the clock from here.
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)

# The real agent's full heartbeat, verbatim from the agent reference.
AGENT_HEARTBEAT: dict[str, Any] = {**copy.deepcopy(REFERENCE_HEARTBEAT), "host_id": HOST_ID}
MINIMAL_HEARTBEAT = {"host_id": HOST_ID, "status": "online", "active_jobs": 0, "timestamp": 100}


def beat(
    islands: Island | Iterable[Island], at: datetime, status: str = "online", **fields: Any
) -> list[HeartbeatOutcome]:
    """One heartbeat of each Island, received at `at`, through the method every transport calls.

    Named by host id, as the NATS bridge names them; `fields` go into the
    body (`{"status": status, **fields}`). HTTP heartbeats: `send_heartbeat`.
    """
    heartbeat = msgspec.convert({"status": status, **fields}, EnhancedHeartbeat)
    batch = [islands] if isinstance(islands, Island) else list(islands)
    return Island.objects.record_heartbeats([Beat(heartbeat, at, host_id=island.host_id) for island in batch])


def give_job(
    *,
    island: Island,
    job_id: str,
    workload: str = "llm-chat",
    credits: Decimal = Decimal(1),
    lease: timedelta = timedelta(minutes=5),
    now: datetime | None = None,
) -> Job:
    """Record that `island` holds a job for a fixed amount, as a placement on it would.

    Whatever placement's rules would say (online, capacity...): for tests of
    what happens to a job once it has an Island. Placement itself is tested
    through Job.objects.submit (tests/islands/test_placement.py).
    """
    now = now or timezone.now()
    spec = JobSpec(job_id=job_id, workload=workload, lease=lease, budget=credits, credits=credits)
    with transaction.atomic():
        Island.objects.filter(pk=island.pk).update(jobs_running=F("jobs_running") + 1)
        seat = Seat(island.pk, island.host_id, island.transport, credits)
        return Job.objects._record(spec, seat, now, None)


def make_island(owner: User, host_id: str = HOST_ID, **fields: Any) -> Island:
    fields.setdefault("gpu_model", "RTX 4090")
    fields.setdefault("gpu_vram_mb", 24576)
    fields.setdefault("cpu_cores", 16)
    fields.setdefault("ram_mb", 65536)
    return Island.objects.create(owner=owner, host_id=host_id, **fields)


@pytest.fixture
def island(alice: User) -> Island:
    """Alice's desktop Island, paired, with no heartbeat yet."""
    return make_island(alice)


@pytest.fixture
def token(island: Island) -> str:
    return island.issue_token()


def post_json(client: Client, url: str, payload: Any, token: str | None = None, **extra: Any) -> Any:
    body = payload if isinstance(payload, bytes | str) else json.dumps(payload)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post(url, body, content_type="application/json", headers=headers, **extra)


@pytest.fixture
def send_heartbeat(client: Client, token: str) -> Callable[..., Any]:
    """POST a heartbeat as Alice's Island (the agent's full one unless told otherwise)."""

    def send(payload: Any = None, token: str | None = token) -> Any:
        return post_json(
            client, "/api/v1/islands/heartbeat", AGENT_HEARTBEAT if payload is None else payload, token
        )

    return send
