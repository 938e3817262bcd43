"""The outbox under faults, on PostgreSQL: `nats_bridge` processes SIGKILLed mid-batch, and two at once.

A sender publishes with no transaction open and records what it sent
afterwards, so a sender killed in between leaves messages published but
not recorded. Their claims pass, another sender publishes them again under
the same Nats-Msg-Id, and the stream keeps the first copy: each agent
receives each AssignJob once. Two bridges split the outbox by claims (row
locks with SKIP LOCKED) and never publish one message twice.

A core NATS subscriber on host.*.jobs (as an agent without the stream is)
sees every publish, including the ones the stream drops as duplicates, so
it counts publishes; agent-shaped consumers count what is stored and
delivered. Like tests/faults, these need PostgreSQL and skip without it.
"""

import asyncio
import json
import signal
import threading
import uuid
from collections import Counter
from typing import Any

import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig

from archipelag.nats import Subjects, default_stream
from islands.models import Island, OutboxMessage
from tests.bridge.test_nats import Agent, delete_stream
from tests.bridge.test_outbox import all_sent, nats_island, submit
from tests.faults.conftest import bridge_counters, faults, spawn, terminate_backends, wait_for

__all__ = ["faults", "spawn"]  # fixtures, imported to be used here

JOBS = 400
HOSTS = 20


class Publishes(Agent):
    """A core subscriber on every host's jobs subject: one entry per publish, by Nats-Msg-Id."""

    def __init__(self, url: str, subjects: Subjects):
        super().__init__(url, subjects)
        self.seen: Counter[str] = Counter()
        self._lock = threading.Lock()

        async def on_publish(msg: Any) -> None:
            with self._lock:
                self.seen[(msg.headers or {})["Nats-Msg-Id"]] += 1

        async def subscribe() -> None:
            await self.nc.subscribe(subjects.of_hosts("jobs"), cb=on_publish)
            await self.nc.flush()

        self._run(subscribe())

    def snapshot(self) -> Counter[str]:
        self._run(self.synced())
        with self._lock:
            return Counter(self.seen)


def received_by_agents(url: str, subjects: Subjects, stream: str, hosts: list[str]) -> Counter[str]:
    """Each host's agent binds its consumer as src/nats.rs does and takes every job waiting for it."""

    async def receive() -> Counter[str]:
        got: Counter[str] = Counter()
        nc = await nats.connect(url)
        try:
            jsm, js = nc.jsm(), nc.jetstream()
            for host in hosts:
                name = f"host-{host}"
                await jsm.add_consumer(
                    stream,
                    ConsumerConfig(
                        durable_name=name,
                        ack_policy=AckPolicy.EXPLICIT,
                        filter_subject=subjects.of_host(host, "jobs"),
                        max_deliver=5,
                        ack_wait=60,
                    ),
                )
                pull = await js.pull_subscribe_bind(durable=name, stream=stream)
                while True:
                    try:
                        messages = await pull.fetch(50, timeout=1)
                    except TimeoutError:  # nats-py raises its own or asyncio's
                        break
                    for message in messages:
                        await message.ack()
                        got[json.loads(message.data)["job_id"]] += 1
        finally:
            await nc.close()
        return got

    return asyncio.run(receive())


def place_jobs(owner: Any) -> list[str]:
    hosts = [nats_island(owner, host_id=f"fault-host-{n:04d}").host_id for n in range(HOSTS)]
    Island.objects.update(capacity=JOBS)
    return hosts


def start_bridge(spawn: Any, url: str, prefix: str, *options: str, app_name: str | None = None) -> Any:
    bridge = spawn.command(
        "bridge",
        "nats_bridge",
        "--url",
        url,
        "--subject-prefix",
        prefix,
        "--stats-interval",
        "0.5",
        *options,
        app_name=app_name,
    )
    bridge.wait_for_log("event=bridge_ready")
    return bridge


def test_a_bridge_killed_between_publish_and_record_republishes_and_agents_get_each_job_once(
    spawn, nats_url, alice
):
    hosts = place_jobs(alice)
    islands = list(Island.objects.all())
    for n in range(JOBS):
        submit(f"job-killed-{n:04d}", island=islands[n % HOSTS])
    prefix = f"faults{uuid.uuid4().hex[:12]}."
    subjects, stream = Subjects(prefix), default_stream(prefix)
    publishes = Publishes(nats_url, subjects)
    try:
        first = start_bridge(spawn, nats_url, prefix, "--claim-seconds", "3")
        wait_for(lambda: publishes.seen, timeout=30, what="the first publishes")
        first.kill()  # SIGKILL: mid-batch, between publishing and recording it
        published = set(publishes.snapshot())
        recorded = set(OutboxMessage.objects.filter(sent_at__isnull=False).values_list("msg_id", flat=True))
        unrecorded = published - recorded
        assert recorded <= published
        assert unrecorded, (
            f"the kill came after the batch was recorded ({len(published)} published, "
            f"{len(recorded)} recorded): this run did not test what it is for"
        )
        # What it claimed and never got to is claimed still, until its claims pass.
        assert OutboxMessage.objects.filter(sent_at__isnull=True, claimed_until__isnull=False).exists()

        second = start_bridge(spawn, nats_url, prefix)
        wait_for(all_sent, timeout=60, what="the second bridge to send everything")
        assert second.stop(signal.SIGTERM) == 0
        counters = bridge_counters(second.output())

        # Published again under the same id; the stream kept the first copy.
        assert counters["outbox_duplicates"] == len(unrecorded)
        again = publishes.snapshot()
        assert {msg_id for msg_id, count in again.items() if count == 2} == unrecorded
        assert set(again.values()) <= {1, 2}
        # Each agent gets each of its jobs exactly once.
        got = received_by_agents(nats_url, subjects, stream, hosts)
        assert got == Counter({f"job-killed-{n:04d}": 1 for n in range(JOBS)})
        # And each was recorded at the sequence the stream stored it at.
        assert OutboxMessage.objects.filter(stream_seq__isnull=True).count() == 0
        assert OutboxMessage.objects.values("stream_seq").distinct().count() == JOBS
    finally:
        publishes.close()
        delete_stream(nats_url, stream)


def test_two_bridges_share_the_outbox_and_never_publish_a_message_twice(spawn, nats_url, alice):
    hosts = place_jobs(alice)
    islands = list(Island.objects.all())
    prefix = f"faults{uuid.uuid4().hex[:12]}."
    subjects, stream = Subjects(prefix), default_stream(prefix)
    publishes = Publishes(nats_url, subjects)
    try:
        bridges = [start_bridge(spawn, nats_url, prefix, "--outbox-batch", "10") for _ in range(2)]

        # Submitted while both run: every commit's NOTIFY wakes both senders.
        def submit_share(start: int) -> None:
            try:
                for n in range(start, JOBS, 4):
                    submit(f"job-two-{n:04d}", island=islands[n % HOSTS])
            finally:
                from django.db import connection

                connection.close()

        threads = [threading.Thread(target=submit_share, args=(start,)) for start in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_for(all_sent, timeout=60, what="both bridges to send everything")
        assert all(bridge.stop(signal.SIGTERM) == 0 for bridge in bridges)

        counts = [bridge_counters(bridge.output()) for bridge in bridges]
        assert sum(c.get("outbox_sent_assign", 0) for c in counts) == JOBS
        assert all(c.get("outbox_duplicates", 0) == 0 for c in counts)
        seen = publishes.snapshot()
        assert len(seen) == JOBS and set(seen.values()) == {1}
        got = received_by_agents(nats_url, subjects, stream, hosts)
        assert got == Counter({f"job-two-{n:04d}": 1 for n in range(JOBS)})
    finally:
        publishes.close()
        delete_stream(nats_url, stream)


def test_the_sender_listens_again_after_its_database_connection_drops(spawn, nats_url, alice):
    """Its LISTEN connection is terminated (a restart, a failover): it polls meanwhile and listens again."""
    hosts = place_jobs(alice)
    islands = list(Island.objects.all())
    prefix = f"faults{uuid.uuid4().hex[:12]}."
    subjects, stream = Subjects(prefix), default_stream(prefix)
    app_name = f"faults-bridge-{uuid.uuid4().hex[:8]}"
    publishes = Publishes(nats_url, subjects)
    try:
        bridge = start_bridge(spawn, nats_url, prefix, app_name=app_name)
        submit("job-before", island=islands[0])
        wait_for(lambda: publishes.seen, what="the first delivery")
        # Every backend of the bridge goes, its LISTEN connection among them.
        assert terminate_backends(app_name)
        submit("job-meanwhile", island=islands[1])
        bridge.wait_for_log("event=outbox_listening_again")
        wait_for(lambda: "job-meanwhile:1" in publishes.snapshot(), what="the job placed meanwhile")
        submit("job-after", island=islands[2])
        wait_for(lambda: "job-after:1" in publishes.snapshot(), what="the job placed after")
        assert bridge.stop(signal.SIGTERM) == 0
        counters = bridge_counters(bridge.output())
        assert counters["outbox_listen_errors"] >= 1
        assert counters["outbox_sent_assign"] == 3
        assert received_by_agents(nats_url, subjects, stream, hosts[:3]) == Counter(
            {"job-before": 1, "job-meanwhile": 1, "job-after": 1}
        )
    finally:
        publishes.close()
        delete_stream(nats_url, stream)
