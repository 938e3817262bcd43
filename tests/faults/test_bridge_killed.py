"""`nats_bridge` SIGKILLed mid-batch and restarted, on a nats-server of the test's own.

Job statuses: each terminal state is applied by a conditional UPDATE of the
job, its counter on the Island and its karma event (unique per job) in one
transaction, so a status is applied whole or not at all, and a status sent
again is a repeat that changes nothing. What core NATS does not give is
delivery: a status the killed bridge had received but not committed is
gone, unless the agent sends it again. The test sends every status again
after the restart, as a retrying agent would, and checks that each outcome
and its karma were applied exactly once.

Heartbeats wait in the bridge's memory for their batch (up to 250 ms, or
500 hosts, by default). A SIGKILL loses those; the Island's next heartbeat,
10 s later, says the same and more, so nothing is recorded wrongly, only
late. SIGTERM drains and writes every heartbeat received. The second test
shows both.
"""

import json
import signal
import uuid
from collections import Counter
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Sum
from django.utils import timezone

from archipelag.nats import Subjects
from islands.models import Island, Job, StatusChange
from karma.models import KarmaEvent
from tests.bridge.test_nats import Agent
from tests.faults.conftest import bridge_counters, wait_for
from tests.islands.conftest import MINIMAL_HEARTBEAT, give_job

HOSTS = 100
JOBS_PER_HOST = 8
JOBS = HOSTS * JOBS_PER_HOST
START = Decimal(50)


def make_hosts(owner: Any, count: int) -> list[Island]:
    tag = uuid.uuid4().hex[:8]
    return Island.objects.bulk_create(
        Island(owner=owner, host_id=f"bridge-{tag}-{n:04d}", name=f"Bridge {n}") for n in range(count)
    )


def outcome(job: Job) -> str:
    """Of each host's eight jobs, the last two fail."""
    return "failed" if int(job.job_id.rsplit("-", 1)[1]) >= 6 else "succeeded"


def publish(agent: Agent, messages: list[tuple[str, dict[str, Any]]]) -> None:
    """Publish everything, then wait until the server has it all."""

    async def send() -> None:
        for subject, body in messages:
            await agent.nc.publish(subject, json.dumps(body).encode())
        await agent.synced()

    agent._run(send(), timeout=60)


def heartbeats(agent: Agent, hosts: list[Island]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (agent.subjects.of_host(host.host_id, "heartbeat"), {**MINIMAL_HEARTBEAT, "host_id": host.host_id})
        for host in hosts
    ]


def statuses(agent: Agent, jobs: list[Job]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (agent.subjects.of_host(job.island.host_id, "status"), {"job_id": job.job_id, "state": outcome(job)})
        for job in jobs
    ]


def settled() -> int:
    return Job.objects.exclude(state__in=Job.ACTIVE_STATES).count()


def assert_nothing_half_applied() -> None:
    """Each settled job has its counter and its karma; nothing else moved."""
    ended = Job.objects.exclude(state__in=Job.ACTIVE_STATES)
    job_events = Counter(KarmaEvent.objects.values_list("job_id", flat=True))
    assert job_events == Counter(ended.values_list("pk", flat=True)), "an outcome without its karma, or twice"
    totals = dict(
        KarmaEvent.objects.values("island").annotate(total=Sum("delta")).values_list("island", "total")
    )
    for island in Island.objects.all():
        mine = ended.filter(island=island)
        succeeded = mine.filter(state=Job.State.SUCCEEDED)
        assert island.jobs_completed == succeeded.count()
        assert island.jobs_failed == mine.filter(state=Job.State.FAILED).count()
        assert island.earnings == (succeeded.aggregate(paid=Sum("credits"))["paid"] or 0)
        assert island.karma == START + (totals.get(island.pk) or 0)
    # A heartbeat batch is written whole: each Island seen has its first-heartbeat change, once.
    seen = set(Island.objects.filter(last_heartbeat_at__isnull=False).values_list("pk", flat=True))
    changes = Counter(StatusChange.objects.values_list("island_id", flat=True))
    assert changes == Counter(seen), "a heartbeat without its status change, or twice"


def bridge_command(spawn: Any, url: str, prefix: str, *options: str) -> Any:
    bridge = spawn.command(
        "bridge", "nats_bridge", "--url", url, "--subject-prefix", prefix, "--stats-interval", "0.2", *options
    )
    bridge.wait_for_log("event=bridge_ready")
    return bridge


def test_the_bridge_killed_mid_batch_applies_each_job_outcome_once(spawn, nats_server, alice):
    hosts = make_hosts(alice, HOSTS)
    now = timezone.now()
    # Each with its attempt and its slot, as a placement leaves them.
    jobs = [
        give_job(
            island=host,
            job_id=f"{host.host_id}-job-{n}",
            credits=Decimal("1.5"),
            lease=timedelta(hours=1),
            now=now,
        )
        for n in range(JOBS_PER_HOST)
        for host in hosts
    ]
    prefix = f"faults{uuid.uuid4().hex[:12]}."
    agent = Agent(nats_server.url, Subjects(prefix))
    try:
        first = bridge_command(spawn, nats_server.url, prefix)
        publish(agent, heartbeats(agent, hosts) + statuses(agent, jobs) + heartbeats(agent, hosts))
        wait_for(lambda: 0 < settled() < JOBS, what="the bridge to be applying statuses")
        first.kill()
        settled_at_kill = settled()
        assert 0 < settled_at_kill < JOBS
        assert_nothing_half_applied()

        # The agents report again (and beat again); a new bridge applies what
        # was lost and recognises what was already applied.
        restarted_at = timezone.now()
        second = bridge_command(spawn, nats_server.url, prefix)
        publish(agent, statuses(agent, jobs) + heartbeats(agent, hosts))
        wait_for(lambda: settled() == JOBS, what="every job to be settled")
        wait_for(
            lambda: Island.objects.filter(last_heartbeat_at__gte=restarted_at).count() == HOSTS,
            what="every Island's heartbeat after the restart",
        )
        assert second.stop(signal.SIGTERM) == 0
    finally:
        agent.close()

    counters = bridge_counters(second.output())
    assert counters["statuses_received"] == JOBS
    assert counters["status_applied"] == JOBS - settled_at_kill
    assert counters["status_repeat"] == settled_at_kill
    assert "status_conflict" not in counters and "status_failed" not in counters

    assert_nothing_half_applied()
    assert KarmaEvent.objects.count() == JOBS
    assert dict(Counter(Job.objects.values_list("state", flat=True))) == {
        "succeeded": JOBS * 3 // 4,
        "failed": JOBS // 4,
    }
    # Per host: 6 succeeded (+0.25 each, no start reported), 2 failed (−2 each).
    assert set(Island.objects.values_list("jobs_completed", "jobs_failed", "earnings", "karma")) == {
        (6, 2, Decimal("9"), Decimal("47.5"))
    }
    assert StatusChange.objects.count() == HOSTS
    assert Island.objects.active().online().count() == HOSTS


def test_sigkill_loses_the_heartbeats_waiting_in_memory_and_sigterm_writes_them(spawn, nats_server, alice):
    hosts = make_hosts(alice, 300)
    prefix = f"faults{uuid.uuid4().hex[:12]}."
    # Nothing is written for ten minutes unless the bridge stops: every
    # heartbeat received stays in memory.
    hold = ("--flush-ms", "600000", "--batch-size", "100000")
    agent = Agent(nats_server.url, Subjects(prefix))
    try:
        killed = bridge_command(spawn, nats_server.url, prefix, *hold)
        publish(agent, heartbeats(agent, hosts))
        killed.wait_for_log(f"event=bridge_stats pending={len(hosts)} ")
        killed.kill()
        # At most once: received, not written, gone. The agents' next beats
        # (every 10 s) carry the same news.
        assert not Island.objects.filter(last_heartbeat_at__isnull=False).exists()

        stopped = bridge_command(spawn, nats_server.url, prefix, *hold)
        publish(agent, heartbeats(agent, hosts))
        stopped.wait_for_log(f"event=bridge_stats pending={len(hosts)} ")
        assert stopped.stop(signal.SIGTERM) == 0
    finally:
        agent.close()
    assert Island.objects.filter(last_heartbeat_at__isnull=False).count() == len(hosts)
    assert bridge_counters(stopped.output())["heartbeats_applied"] == len(hosts)
    assert StatusChange.objects.count() == len(hosts)
