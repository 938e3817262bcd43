"""Delivering jobs to the real agent: the outbox sender and the JOBS stream, against a real nats-server.

The agent here does what the real one's source does (archipelag-io/island,
src/nats.rs `subscribe_jobs`, `try_jetstream_subscribe`, `JobSubscription::next`):
it looks the stream up, gets or creates its durable pull consumer
`host-{host_id}` (filter host.{host_id}.jobs, explicit ack, max_deliver 5,
ack_wait 60 s), acks each message on receipt, and decodes it as its serde
struct `AssignJob` would; or, without the stream, it subscribes on core
NATS. It listens for `{"job_id"}` on host.{host_id}.cancel on core NATS and
reports JobStatus on host.{host_id}.status. Every test's subjects and
stream are its own (a fresh prefix); the stream is deleted after.
"""

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import msgspec
import nats.errors
import nats.js.errors
import pytest
from django.db import connection
from django.db.models import F
from django.utils import timezone
from nats.js.api import AckPolicy, ConsumerConfig

from archipelag.nats import RETRY_HORIZON, Bridge, OutboxSender, Subjects, default_stream
from islands.models import Attempt, Island, Job, JobSpec, OutboxMessage
from karma.models import KarmaEvent
from tests.bridge.test_nats import (
    Agent,
    NatsServer,
    bridge,
    bridge_process,
    delete_stream,
    fresh_prefix,
    own_nats,
    run_bridge,
    stop_bridge,
    wait_for,
)
from tests.conftest import HOST_ID, _free_port
from tests.faults.conftest import bridge_counters
from tests.islands.conftest import beat, make_island

__all__ = ["bridge", "bridge_process", "own_nats"]  # fixtures, imported to be used here

OTHER_HOST = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
ARTEFACTS = {
    "container_image": "registry.example.com/llm-chat:latest",
    "image_digest": "sha256:abcdef1234567890",
    "sandbox_tier": "standard",
}
U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]


class AssignJob(msgspec.Struct):
    """The agent's serde struct (src/nats.rs), field for field and type for type.

    serde ignores unknown fields and fills absent Options with None; strings
    never accept numbers, except workload_id, which takes an integer too.
    """

    job_id: str
    lease_expires: int
    input: Any = None
    workload_id: str | int | None = None
    runtime_type: str = "container"
    container_image: str | None = None
    image_digest: str | None = None
    wasm_url: str | None = None
    wasm_hash: str | None = None
    model_url: str | None = None
    model_hash: str | None = None
    model_context_size: U32 | None = None
    model_temperature: float | None = None
    onnx_model_url: str | None = None
    onnx_model_hash: str | None = None
    onnx_task_type: str | None = None
    sandbox_tier: str | None = None
    pipeline_config: Any = None
    expert_config: Any = None
    speculative_config: Any = None
    training_config: Any = None


class Delivery(msgspec.Struct):
    job: AssignJob
    body: dict[str, Any]
    msg_id: str | None
    stream_seq: int | None


class JobsAgent(Agent):
    """The agent's job side, as its source does it, on the test's subjects and stream."""

    def __init__(self, url: str, subjects: Subjects, stream: str, host_id: str = HOST_ID):
        super().__init__(url, subjects, host_id)
        self.stream = stream
        self.pull: Any = None
        self.core_jobs: list[Delivery] = []
        self.cancels: list[dict[str, Any]] = []
        self._listen_to_cancels()

    @property
    def consumer(self) -> str:
        return f"host-{self.host_id}"

    def bind(self) -> None:
        """try_jetstream_subscribe: the stream must exist; get or create the durable consumer."""

        async def bind() -> None:
            jsm = self.nc.jsm()
            await jsm.stream_info(self.stream)  # js.get_stream("JOBS")
            try:
                await jsm.consumer_info(self.stream, self.consumer)
            except nats.js.errors.NotFoundError:
                await jsm.add_consumer(
                    self.stream,
                    ConsumerConfig(
                        durable_name=self.consumer,
                        ack_policy=AckPolicy.EXPLICIT,
                        filter_subject=self.subjects.of_host(self.host_id, "jobs"),
                        max_deliver=5,
                        ack_wait=60,
                    ),
                )
            self.pull = await self.nc.jetstream().pull_subscribe_bind(
                durable=self.consumer, stream=self.stream
            )

        self._run(bind())

    def next_job(self, timeout: float = 15) -> Delivery:
        """JobSubscription::next: the next message, acked on receipt, then parse_job_assignment."""

        async def fetch() -> Any:
            messages = await self.pull.fetch(1, timeout=timeout)
            await messages[0].ack()
            return messages[0]

        message = self._run(fetch(), timeout=timeout + 10)
        return self._delivery(message.data, message.headers, message.metadata.sequence.stream)

    def no_job(self, wait: float = 1.5) -> bool:
        async def fetch() -> bool:
            try:
                await self.pull.fetch(1, timeout=wait)
            except TimeoutError:  # nats-py raises its own or asyncio's
                return True
            return False

        return bool(self._run(fetch(), timeout=wait + 10))

    @staticmethod
    def _delivery(data: bytes, headers: dict[str, str] | None, seq: int | None) -> Delivery:
        return Delivery(
            job=msgspec.json.decode(data, type=AssignJob, strict=True),
            body=json.loads(data),
            msg_id=(headers or {}).get("Nats-Msg-Id"),
            stream_seq=seq,
        )

    def subscribe_core(self) -> None:
        """subscribe_jobs' fallback: host.{id}.jobs on core NATS."""

        async def on_job(msg: Any) -> None:
            self.core_jobs.append(self._delivery(msg.data, msg.headers, None))

        async def subscribe() -> None:
            await self.nc.subscribe(self.subjects.of_host(self.host_id, "jobs"), cb=on_job)
            await self.nc.flush()

        self._run(subscribe())

    def _listen_to_cancels(self) -> None:
        async def on_cancel(msg: Any) -> None:
            self.cancels.append(json.loads(msg.data))

        async def subscribe() -> None:
            await self.nc.subscribe(self.subjects.of_host(self.host_id, "cancel"), cb=on_cancel)
            await self.nc.flush()

        self._run(subscribe())

    def report(self, job_id: str, state: str, error: str | None = None) -> None:
        """publish_status: JobStatus with the agent's millisecond timestamp."""
        status: dict[str, Any] = {"job_id": job_id, "state": state, "timestamp": int(time.time() * 1000)}
        if error is not None:
            status["error"] = error
        self.send("status", status)

    def stream_messages(self) -> int:
        async def count() -> int:
            return int((await self.nc.jsm().stream_info(self.stream)).state.messages)

        return int(self._run(count()))


# --- Builders ---------------------------------------------------------------------------


def nats_island(owner: Any, host_id: str = HOST_ID, **fields: Any) -> Island:
    """An Island paired over NATS, online now, with room for four jobs."""
    island = make_island(owner, host_id=host_id, transport=Island.Transport.NATS, **fields)
    beat(island, timezone.now(), performance_estimates={"max_concurrent_containers": 4})
    island.refresh_from_db()
    return island


def submit(job_id: str, island: Island | None = None, lease: timedelta = timedelta(minutes=5)) -> Job:
    spec = JobSpec(
        job_id=job_id,
        workload="llm-chat",
        lease=lease,
        budget=Decimal(5),
        input={"prompt": "Hello", "max_tokens": 64},
        artefacts=ARTEFACTS,
    )
    return Job.objects.submit(spec, island=island)


def assign_row(job: Job, attempt: int = 1) -> OutboxMessage:
    return OutboxMessage.objects.get(kind=OutboxMessage.Kind.ASSIGN, msg_id=f"{job.job_id}:{attempt}")


def sent(job: Job, attempt: int = 1) -> OutboxMessage | None:
    row = assign_row(job, attempt)
    return row if row.sent_at is not None else None


def all_sent() -> bool:
    return not OutboxMessage.objects.filter(sent_at__isnull=True, withdrawn_at__isnull=True).exists()


@pytest.fixture
def island(alice: Any) -> Island:
    return nats_island(alice)


@pytest.fixture
def agent(nats_url: str, bridge: Bridge) -> Iterator[JobsAgent]:
    agent = JobsAgent(nats_url, bridge.subjects, bridge.stream)
    yield agent
    agent.close()


class SenderHarness(Agent):
    """An OutboxSender on a connection of its own, stepped by the test (no loop running)."""

    def __init__(self, url: str, prefix: str, claim_seconds: float = 30):
        super().__init__(url, Subjects(prefix))
        self.stream = default_stream(prefix)
        self.counters: Counter[str] = Counter()
        self.sender = OutboxSender(
            self.nc, self.subjects, self.stream, self.counters, claim_seconds=claim_seconds
        )
        assert self._run(self.sender.ensure_stream())

    def step(self) -> int:
        return int(self._run(self.sender.step()))

    def publish_as_a_dead_sender(self, message: OutboxMessage) -> int:
        """What a sender killed before recording it had published: the stream's copy."""

        async def publish() -> int:
            ack = await self.nc.jetstream().publish(
                self.subjects.prefix + message.subject,
                message.payload.encode(),
                headers={"Nats-Msg-Id": message.msg_id},
            )
            return int(ack.seq)

        return int(self._run(publish()))

    def close(self) -> None:
        self.sender.close()
        super().close()


@pytest.fixture
def harness(nats_url: str, transactional_db: None) -> Iterator[SenderHarness]:
    harness = SenderHarness(nats_url, fresh_prefix())
    yield harness
    harness.close()
    delete_stream(nats_url, harness.stream)


@pytest.fixture
def harness_agent(nats_url: str, harness: SenderHarness) -> Iterator[JobsAgent]:
    agent = JobsAgent(nats_url, harness.subjects, harness.stream)
    yield agent
    agent.close()


# --- The round trip ----------------------------------------------------------------------


def test_an_agent_shaped_consumer_receives_its_assign_job_and_its_reports_count(agent, island, bridge):
    agent.bind()  # the agent started before the job was placed
    job = submit("job-round-trip")
    assert (job.island_id, job.state) == (island.pk, Job.State.ASSIGNED)

    delivery = agent.next_job()
    assert delivery.job == AssignJob(
        job_id="job-round-trip",
        workload_id="llm-chat",
        input={"prompt": "Hello", "max_tokens": 64},
        lease_expires=int(job.lease_expires_at.timestamp() * 1000),
        runtime_type="container",
        container_image=ARTEFACTS["container_image"],
        image_digest=ARTEFACTS["image_digest"],
        sandbox_tier=ARTEFACTS["sandbox_tier"],
    )
    # Exactly the agent's field names; nothing it would have to ignore.
    assert set(delivery.body) == {
        "job_id",
        "workload_id",
        "input",
        "lease_expires",
        "runtime_type",
        *ARTEFACTS,
    }
    assert delivery.msg_id == "job-round-trip:1"
    row = wait_for(lambda: sent(job), what="the outbox row to be marked sent")
    assert row.stream_seq == delivery.stream_seq
    assert row.tries == 1

    agent.report("job-round-trip", "started")
    wait_for(lambda: Job.objects.get(pk=job.pk).state == Job.State.STARTED, what="started")
    agent.report("job-round-trip", "succeeded")
    wait_for(lambda: Job.objects.get(pk=job.pk).state == Job.State.SUCCEEDED, what="succeeded")

    island.refresh_from_db()
    assert (island.jobs_completed, island.jobs_failed, island.jobs_running) == (1, 0, 0)
    assert island.earnings == job.credits == Decimal(1)  # the Island's ask: the service's default
    assert KarmaEvent.objects.filter(island=island).count() == 1
    assert agent.stream_messages() == 0  # acked on receipt, and work-queue retention removed it
    assert (bridge.counters["outbox_sent_assign"], bridge.counters["outbox_failed"]) == (1, 0)


@pytest.mark.parametrize("had_a_consumer", [True, False], ids=["reconnecting", "first-start"])
def test_an_agent_away_when_the_job_is_published_gets_it_when_it_binds(
    nats_url, island, bridge, had_a_consumer
):
    if had_a_consumer:
        before = JobsAgent(nats_url, bridge.subjects, bridge.stream)
        before.bind()
        before.close()  # the agent goes away (a restart, a network drop)
    job = submit("job-while-away")
    wait_for(lambda: sent(job), what="the AssignJob to be published")

    agent = JobsAgent(nats_url, bridge.subjects, bridge.stream)
    try:
        assert agent.stream_messages() == 1  # it waited in the stream
        agent.bind()
        delivery = agent.next_job()
        assert (delivery.job.job_id, delivery.msg_id) == ("job-while-away", "job-while-away:1")
        assert agent.no_job()  # once
    finally:
        agent.close()


def test_an_agent_on_core_nats_receives_the_assign_job_too(agent, island, bridge):
    """Without the stream at its start (or after heartbeat failures) the agent subscribes on core NATS."""
    agent.subscribe_core()
    submit("job-core")
    wait_for(lambda: agent.core_jobs, what="the AssignJob on core NATS")
    assert [d.job.job_id for d in agent.core_jobs] == ["job-core"]
    assert agent.core_jobs[0].msg_id == "job-core:1"


# --- Cancel, and AssignJobs that are no longer current ---------------------------------------


def test_a_cancel_reaches_the_agent_running_the_job(agent, island, bridge):
    agent.bind()
    job = submit("job-to-cancel")
    assert agent.next_job().job.job_id == "job-to-cancel"
    agent.report("job-to-cancel", "started")
    wait_for(lambda: Job.objects.get(pk=job.pk).state == Job.State.STARTED, what="started")

    Job.objects.cancel("job-to-cancel")
    wait_for(lambda: agent.cancels, what="the cancel on host.{id}.cancel")
    assert agent.cancels == [{"job_id": "job-to-cancel"}]
    # The agent stops it and says so; the job stays cancelled, the Island loses nothing.
    agent.report("job-to-cancel", "cancelled")
    wait_for(lambda: bridge.counters["status_repeat"] == 1, what="the agent's cancelled status")
    island.refresh_from_db()
    assert (island.jobs_completed, island.jobs_failed, island.jobs_running, island.earnings) == (0, 0, 0, 0)
    assert not KarmaEvent.objects.filter(island=island).exists()
    wait_for(all_sent, what="the cancel and the deletion to be done")
    # The agent took it already: nothing left to delete.
    assert bridge.counters["outbox_deleted_from_stream"] == 0


def test_a_cancelled_job_waiting_in_the_stream_is_deleted_and_never_runs(nats_url, island, bridge):
    job = submit("job-cancelled-while-away")
    wait_for(lambda: sent(job), what="the AssignJob to be published")
    Job.objects.cancel("job-cancelled-while-away")
    wait_for(all_sent, what="the cancel and the deletion")
    assert bridge.counters["outbox_deleted_from_stream"] == 1

    # The agent comes back after the cancel (which it missed: core NATS keeps nothing).
    agent = JobsAgent(nats_url, bridge.subjects, bridge.stream)
    try:
        assert agent.stream_messages() == 0
        agent.bind()
        assert agent.no_job()
        assert agent.cancels == []
    finally:
        agent.close()
    assert Job.objects.get(pk=job.pk).state == Job.State.CANCELLED


def test_a_job_placed_again_after_a_timeout_reaches_only_its_new_island(nats_url, alice, bridge):
    first = nats_island(alice)
    second = nats_island(alice, host_id=OTHER_HOST)
    job = submit("job-moving", island=first, lease=timedelta(seconds=5))
    wait_for(lambda: sent(job), what="the first AssignJob")

    # The first Island never answers; its lease runs out and the watcher moves the job.
    later = job.lease_expires_at + timedelta(seconds=1)
    assert Job.objects.time_out_expired(later) == ["job-moving"]
    assert Job.objects.place_queued(later) == 1
    job.refresh_from_db()
    assert (job.island_id, job.attempt) == (second.pk, 2)
    wait_for(all_sent, what="the second AssignJob and the first one's deletion")
    assert bridge.counters["outbox_deleted_from_stream"] == 1

    old = JobsAgent(nats_url, bridge.subjects, bridge.stream, host_id=first.host_id)
    new = JobsAgent(nats_url, bridge.subjects, bridge.stream, host_id=second.host_id)
    try:
        old.bind()
        assert old.no_job()  # back from wherever it was: the job is no longer its own
        new.bind()
        delivery = new.next_job()
        assert (delivery.job.job_id, delivery.msg_id) == ("job-moving", "job-moving:2")
        assert delivery.job.lease_expires == int(job.lease_expires_at.timestamp() * 1000)
        # Had the first Island run it anyway, its report would be refused.
        old.report("job-moving", "succeeded")
        wait_for(lambda: bridge.counters["status_moved"] == 1, what="the report to be refused")
    finally:
        old.close()
        new.close()
    first.refresh_from_db()
    assert (first.jobs_completed, first.jobs_failed) == (0, 1)  # the timeout, nothing else
    assert Attempt.objects.get(job=job, number=1).outcome == Attempt.Outcome.TIMED_OUT


def test_a_job_cancelled_before_a_sender_took_it_is_never_published(harness, harness_agent, island):
    job = submit("job-never-sent")
    Job.objects.cancel("job-never-sent")
    assert harness.step() == 1  # the cancel; the AssignJob was withdrawn in place
    assign = assign_row(job)
    assert (assign.sent_at, assign.tries) == (None, 0)
    assert assign.withdrawn_at is not None
    assert not OutboxMessage.objects.filter(kind=OutboxMessage.Kind.DELETE).exists()
    harness_agent.bind()
    assert harness_agent.no_job()
    assert harness_agent.stream_messages() == 0


@pytest.mark.parametrize("published", [True, False], ids=["published", "not-published"])
@pytest.mark.parametrize("moved_on", ["while-claimed", "after-the-claim-passed"])
def test_a_job_that_moved_on_after_a_sender_died_holding_it_is_looked_for_and_deleted(
    harness, harness_agent, island, published, moved_on
):
    job = submit("job-dead-sender")
    # A sender claims the AssignJob (for one second) and dies, before or after publishing it.
    now = timezone.now()
    [claimed] = OutboxMessage.objects.claim(now, now + timedelta(seconds=1), limit=10)
    if published:
        harness.publish_as_a_dead_sender(claimed)
    if moved_on == "after-the-claim-passed":
        time.sleep(1.1)
    Job.objects.cancel("job-dead-sender")
    delete = OutboxMessage.objects.get(kind=OutboxMessage.Kind.DELETE)
    # Not withdrawn in place, even with its claim passed: it may be in the stream.
    assert delete.target_id == claimed.pk

    if moved_on == "while-claimed":
        harness.step()  # the cancel goes; the deletion waits while the claim holds
        assert harness.counters["outbox_delete_waits"] == 1
        assert OutboxMessage.objects.get(pk=delete.pk).sent_at is None
        time.sleep(1.1)
        OutboxMessage.objects.filter(pk=delete.pk).update(available_at=timezone.now())
        assert harness.step() == 1  # only the deletion: a targeted AssignJob is never claimed again
    else:
        assert harness.step() == 2  # the cancel and the deletion; never the AssignJob again

    assert OutboxMessage.objects.get(pk=delete.pk).sent_at is not None
    assign = assign_row(job)
    assert assign.sent_at is None and assign.withdrawn_at is not None
    assert harness.counters["outbox_deleted_from_stream"] == (1 if published else 0)
    assert harness_agent.stream_messages() == 0
    harness_agent.bind()
    assert harness_agent.no_job()


def test_an_assign_job_withdrawn_while_its_publish_was_in_flight_is_taken_back(
    harness, harness_agent, island, monkeypatch
):
    """The sender's claim passed mid-publish, and another bridge settled the job's DELETE meanwhile."""
    job = submit("job-slow-sender")
    publish = harness.sender.js.publish

    def another_bridge_settles_the_delete() -> None:
        try:
            OutboxMessage.objects.filter(pk=assign_row(job).pk).update(claimed_until=timezone.now())
            Job.objects.cancel("job-slow-sender")
            delete = OutboxMessage.objects.get(kind=OutboxMessage.Kind.DELETE)
            assert OutboxMessage.objects.settle_target(delete, timezone.now())[0] == "unknown"
        finally:
            connection.close()  # this thread's: the test database is dropped after

    async def slow_publish(*args: Any, **kwargs: Any) -> Any:
        ack = await publish(*args, **kwargs)
        await asyncio.to_thread(another_bridge_settles_the_delete)
        return ack

    monkeypatch.setattr(harness.sender.js, "publish", slow_publish)
    assert harness.step() == 1
    assert harness.counters["outbox_withdrawn_in_flight"] == 1
    assert harness.counters["outbox_deleted_from_stream"] == 1
    assert assign_row(job).sent_at is None
    harness_agent.bind()
    assert harness_agent.no_job()


# --- Retries, duplicates, outages -------------------------------------------------------------


def test_a_publish_repeated_after_a_sender_died_is_stored_once(harness, harness_agent, island):
    job = submit("job-published-twice")
    now = timezone.now()
    [claimed] = OutboxMessage.objects.claim(now, now + timedelta(seconds=1), limit=10)
    first_seq = harness.publish_as_a_dead_sender(claimed)  # and dies before recording it
    time.sleep(1.1)  # its claim passes; the next sender takes the message over

    assert harness.step() == 1
    assert harness.counters["outbox_duplicates"] == 1
    row = assign_row(job)
    assert (row.stream_seq, row.tries) == (first_seq, 2)
    assert harness_agent.stream_messages() == 1
    harness_agent.bind()
    assert harness_agent.next_job().msg_id == "job-published-twice:1"
    assert harness_agent.no_job()


def test_a_message_not_sent_within_the_retry_horizon_is_given_up(harness, island):
    job = submit("job-too-old")
    OutboxMessage.objects.filter(job=job).update(
        created_at=F("created_at") - RETRY_HORIZON - timedelta(seconds=1)
    )
    assert harness.step() == 1
    row = assign_row(job)
    assert row.sent_at is None and row.withdrawn_at is not None
    assert row.last_error.startswith("gave up: not sent within 1 hour")
    assert harness.counters["outbox_given_up"] == 1


@pytest.fixture
def own_jetstream(nats_url: str, tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream of the test's own, keeping its streams in tmp_path across restarts."""
    from tests.bridge.test_nats import NATS_SERVER

    if not Path(NATS_SERVER).exists():
        pytest.skip(f"needs the nats-server binary at {NATS_SERVER} to stop and restart a server")
    server = NatsServer(_free_port(), tmp_path / "nats-server.log", store=tmp_path / "jetstream")
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.kill()
        server.process.wait()


def test_the_outbox_delivers_once_nats_is_back(own_jetstream, island, transactional_db):
    bridge = Bridge([own_jetstream.url], prefix=fresh_prefix(), stats_interval=3600, outbox_poll=0.1)
    thread = run_bridge(bridge)
    agent = None
    try:
        first = submit("job-before-outage")
        wait_for(lambda: sent(first), what="a delivery before the outage")

        own_jetstream.stop()
        wait_for(lambda: bridge.counters["outbox_disconnects"] == 1, what="the sender to see NATS go")
        job = submit("job-during-outage")
        time.sleep(2)  # long enough for many polls: nothing is claimed while NATS is away
        row = assign_row(job)
        assert (row.sent_at, row.tries) == (None, 0)

        own_jetstream.start()  # the stream kept its messages on disk
        row = wait_for(lambda: sent(job), timeout=30, what="the delivery after NATS came back")
        agent = JobsAgent(own_jetstream.url, bridge.subjects, bridge.stream)
        agent.bind()
        received = [agent.next_job().job.job_id, agent.next_job().job.job_id]
        assert received == ["job-before-outage", "job-during-outage"]
        assert agent.no_job()
        assert row.tries == 1
    finally:
        if agent is not None:
            agent.close()
        stop_bridge(bridge, thread)


def test_a_send_that_fails_backs_off_and_the_bridge_carries_on(own_nats, island, transactional_db):
    """A server without JetStream (no stream can exist): the AssignJob waits, the rest goes on."""
    own_nats.start()
    bridge = Bridge([own_nats.url], prefix=fresh_prefix(), stats_interval=3600, outbox_poll=0.1)
    thread = run_bridge(bridge)
    try:
        job = submit("job-no-stream")
        row = wait_for(lambda: (r := assign_row(job)).last_error and r, what="the failed send to be recorded")
        assert row.sent_at is None and row.claimed_until is None
        assert row.available_at > timezone.now() - timedelta(seconds=1)
        assert "stream" in row.last_error
        assert bridge.counters["outbox_failed"] >= 1
        # Still serving: the Island's heartbeat and a ping go through.
        agent = Agent(own_nats.url, bridge.subjects)
        try:
            assert agent.request(agent.subjects.of_host(HOST_ID, "ping"), b"ping", timeout=5) == b"pong"
        finally:
            agent.close()
    finally:
        stop_bridge(bridge, thread)


def test_a_stopped_bridge_leaves_no_message_claimed(nats_url, alice, bridge_process):
    islands = [nats_island(alice, host_id=f"drain-host-{n:04d}") for n in range(20)]
    Island.objects.update(capacity=50)
    for n in range(400):
        submit(f"job-drain-{n:04d}", island=islands[n % len(islands)])
    prefix = fresh_prefix()
    bridge = bridge_process(nats_url, prefix, "--outbox-batch", "20")
    wait_for(lambda: OutboxMessage.objects.filter(sent_at__isnull=False).exists(), what="the first sends")
    assert bridge.stop() == 0
    assert not OutboxMessage.objects.filter(claimed_until__isnull=False, sent_at__isnull=True).exists()
    done = OutboxMessage.objects.filter(sent_at__isnull=False).count()
    assert "event=bridge_stopped" in bridge.output()

    again = bridge_process(nats_url, prefix)
    wait_for(all_sent, what="the next bridge to send the rest")
    assert again.stop() == 0
    assert OutboxMessage.objects.filter(sent_at__isnull=False).count() == 400
    assert bridge_counters(again.output()).get("outbox_sent", 0) == 400 - done
    # Every message went out once: the second bridge took over nothing the first had sent.
    assert bridge_counters(again.output()).get("outbox_duplicates", 0) == 0
