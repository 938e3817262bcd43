"""The NATS bridge: the coordinator's side of the real Island agent's subjects.

The NATS twin of asgi.py: the one module that knows every app's handlers
for what arrives over NATS. The desktop and server agent talks to the
coordinator only over NATS (pairing, registration, heartbeats, job states,
lease renewals, pings). The bridge subscribes to those subjects, decodes
and checks what arrives, and calls the same model methods as the HTTP API,
so the two paths cannot drift apart: it translates, the models decide.
`manage.py nats_bridge` runs it; docs/security.md says what a holder of the
shared NATS credential can and cannot do through it.

- Every subscription joins one queue group, so any number of bridges share
  the load: NATS hands each message to one of them.
- The ORM is synchronous, so database work runs in a small thread pool and
  the event loop only decodes, checks and routes messages.
- Heartbeats are written in batches: one per host (the one
  `islands.models.newest` keeps) waits in memory until `batch_size` hosts
  have beaten or `flush_interval` has passed, then one `record_heartbeats`
  call (one transaction) writes them all.
- Input never stops the bridge: a message that is too large, not JSON, of
  the wrong shape or on a subject naming no valid host is counted, logged
  (at most once per kind every few seconds) and skipped.
- It also speaks first: its outbox sender (OutboxSender) publishes what the
  models wrote to islands.models.OutboxMessage (AssignJobs into the JOBS
  stream, cancels, deletions from the stream) after the transaction that
  decided them committed, and creates the JOBS stream at start when it is
  missing. docs/dispatch.md#delivery states what it guarantees.
"""

import asyncio
import contextlib
import itertools
import logging
import random
import re
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Protocol, TypedDict
from urllib.parse import urlsplit

import msgspec
import psycopg
from django.db import close_old_connections, connections, transaction
from django.utils import timezone
from nats.aio.client import Client as NATS
from nats.aio.client import Server
from nats.aio.subscription import Subscription
from nats.errors import (
    ConnectionClosedError,
    ConnectionReconnectingError,
    OutboundBufferLimitError,
    SlowConsumerError,
)
from nats.errors import Error as NatsError
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ServiceUnavailableError
from nats.js.manager import JetStreamManager

from archipelag.api import DEFAULT_MAX_BODY_BYTES, TRANSIENT_DATABASE_ERRORS, InvalidBody, decode_body
from islands.agent import (
    HEARTBEAT_MAX_BODY_BYTES,
    HOST_ID_PATTERN,
    EnhancedHeartbeat,
    HostRegistration,
    JobStatus,
    LeaseRenewal,
)
from islands.models import (
    JOB_LEASE_MAX,
    OUTBOX_CHANNEL,
    Beat,
    HeartbeatOutcome,
    Island,
    Job,
    JobMoved,
    JobNotFound,
    JobStateConflict,
    OutboxMessage,
    newest,
)
from pairing.models import HostAlreadyLinked, IssueRefused, PairingCode

logger = logging.getLogger("archipelag.bridge")

# Every bridge subscribes in this queue group, so NATS gives each message to
# exactly one of however many bridges run.
QUEUE_GROUP = "archipelag-coordinator"
BATCH_SIZE = 500
FLUSH_INTERVAL = 0.25  # seconds
# A batch written in one transaction never holds more hosts than this, so
# a backlog (after a database outage) is worked off in bounded steps. It was
# 5,000; bench/nats_heartbeats.py on 2 cores wrote 5,400/s with batches
# growing to it (83 µs of bridge CPU a heartbeat) and 7,700/s capped at 500
# (58 µs): two writers with smaller batches overlap Python and PostgreSQL
# better than two with huge ones (docs/performance.md).
MAX_BATCH = 500
# While the database is down heartbeats wait in memory, one per host; past
# this many hosts new ones are dropped (and counted) rather than letting a
# flood of made-up host ids exhaust memory.
MAX_PENDING_HOSTS = 200_000
# Heartbeat batches written at once (each in a transaction of its own).
WRITERS = 2
# Pairing requests wait in a stack of their own, newest first, answered by
# this many tasks. Newest first: behind a burst of requests for made-up
# hosts (issue 13), an honest agent asking now is answered now, not after
# the burst. The agent waits about 10 s for its answer and never asks again
# in that process, so a request older than PAIRING_STALE has nobody
# waiting: it is skipped, not given a code nobody sees. At most
# PAIRING_BACKLOG wait; past that the oldest is dropped.
PAIRING_WORKERS = 2
PAIRING_STALE = 8.0  # seconds
PAIRING_BACKLOG = 10_000
STATS_INTERVAL = 60.0  # seconds
# Waits between connection attempts: doubling from the first to the last,
# each drawn at random between half and all of it so a fleet of bridges
# does not knock on a restarted server at the same instant.
BACKOFF_FIRST = 0.25  # seconds
BACKOFF_MAX = 10.0
# A kind of rejected message is logged at most once per this many seconds;
# the counters carry the rest.
WARN_EVERY = 10.0
# A job status that meets a dropped database connection (a restart, a
# terminated backend) is tried again on a new one, this many times in all,
# waiting from the first delay, doubling. Core NATS delivers it only once,
# so without this it would be lost unless the agent sent it again; and a
# second try is harmless: a status already applied is a repeat.
STATUS_ATTEMPTS = 4
STATUS_RETRY_FIRST = 0.5  # seconds


# --- The outbox sender and the JOBS stream (docs/dispatch.md#delivery) ---
#
# The agent looks this stream up by name once, at start ("JOBS"); see default_stream().
STREAM = "JOBS"
# An AssignJob is worth keeping as long as its job's lease can run, and a
# lease is never renewed past JOB_LEASE_MAX after assignment: an older
# message belongs to a job that ended (and was deleted when it did).
STREAM_MAX_AGE = JOB_LEASE_MAX
# A sender publishes an AssignJob (or a cancel) only within this long of
# the outbox row being written; after that it gives up (outbox_given_up,
# logged): the job stays with its Island until its lease runs out, when
# the watcher moves it on as for any lost job. Every publish of a message,
# first or retried, so falls within RETRY_HORIZON (plus PUBLISH_TIMEOUT) of
# every other: well inside DUPLICATE_WINDOW, within which JetStream drops a
# second copy with the same Nats-Msg-Id. So a retried publish never stores
# an AssignJob twice. The window costs the server memory per message id
# published within it (about 100 bytes each): two hours at 100 jobs a
# second is some 70 MB.
RETRY_HORIZON = timedelta(hours=1)
DUPLICATE_WINDOW = timedelta(hours=2)
# A claimed message is the claimer's this long; a sender killed mid-batch
# hands its messages over when its claims pass. Far longer than a batch
# takes (at most PUBLISH_TIMEOUT of NATS time and two database calls).
CLAIM_SECONDS = 30.0
OUTBOX_BATCH = 100
# The sender wakes on PostgreSQL's NOTIFY at once, and looks anyway this
# often: for SQLite (no NOTIFY), a lost notification, and retries coming due.
OUTBOX_POLL = 1.0
PUBLISH_TIMEOUT = 5.0
# Waits before a failed message is tried again: doubling from the first to
# the last with its tries, at random between half and all of it.
RETRY_FIRST = 0.5  # seconds
RETRY_MAX = 60.0
# A DELETE whose AssignJob a sender is publishing right now looks again after this.
DELETE_WAIT = 0.25  # seconds
# A DELETE looks through at most this many of one host's messages for its target.
FIND_LIMIT = 10_000

_HOST_ID = re.compile(HOST_ID_PATTERN)

type StatusOutcome = Literal["applied", "repeat", "conflict", "moved", "unknown_job", "unknown_host"]
type LeaseOutcome = Literal["extended", "refused", "moved", "unknown_job", "unknown_host"]


class Message(Protocol):
    """What the bridge reads of a NATS message (nats.aio.msg.Msg has it)."""

    subject: str
    reply: str
    data: bytes

    async def respond(self, data: bytes) -> None: ...


class PairingAnswer(TypedDict, total=False):
    success: bool
    code: str
    expires_in_seconds: int
    pair_url: str
    error: str


@dataclass(frozen=True)
class Subjects:
    """The agent's subjects. A prefix keeps test and benchmark runs apart on a shared server."""

    prefix: str = ""

    @property
    def pairing(self) -> str:
        return f"{self.prefix}coordinator.hosts.pairing"

    @property
    def register(self) -> str:
        return f"{self.prefix}coordinator.hosts.register"

    def of_hosts(self, kind: str) -> str:
        return f"{self.prefix}host.*.{kind}"

    def of_host(self, host_id: str, kind: str) -> str:
        return f"{self.prefix}host.{host_id}.{kind}"

    def host_id(self, subject: str, kind: str) -> str | None:
        """The host a `host.{host_id}.{kind}` subject names, or None if it names no valid one."""
        if not subject.startswith(self.prefix):
            return None
        parts = subject[len(self.prefix) :].split(".")
        if len(parts) != 3 or parts[0] != "host" or parts[2] != kind or not _HOST_ID.match(parts[1]):
            return None
        return parts[1]


# --- What each message does to the database (sync; run in the thread pool) --------


def request_code(registration: HostRegistration) -> tuple[str, PairingAnswer]:
    """Answer a pairing request as the HTTP API would; return (outcome, answer)."""
    try:
        issued = PairingCode.objects.request(registration, channel=PairingCode.Channel.NATS)
    except HostAlreadyLinked:
        # The agent matches this exact lowercase text and stops asking.
        return "already_paired", {"success": False, "error": "already paired"}
    except IssueRefused as exc:
        return "rate_limited" if exc.status == 429 else "unavailable", {"success": False, "error": str(exc)}
    return "issued", {
        "success": True,
        "code": issued.code,
        "expires_in_seconds": issued.row.expires_in_seconds(timezone.now()),
        "pair_url": issued.pair_url,
    }


def register(registration: HostRegistration) -> bool:
    """A host's RegisterHost; True if it went to a linked Island."""
    return PairingCode.objects.register(registration)


def record_heartbeats(beats: list[Beat]) -> list[HeartbeatOutcome]:
    """Write one batch in one transaction; one outcome per beat."""
    return Island.objects.record_heartbeats(beats)


def apply_job_status(host_id: str, status: JobStatus) -> StatusOutcome:
    """Apply a JobStatus to a job the coordinator gave this host, as the HTTP endpoint does."""
    assert status.job_id is not None  # the caller refuses statuses without one
    island = Island.objects.linked_host(host_id)
    if island is None:
        return "unknown_host"
    try:
        report = Job.objects.apply_status(island, status.job_id, status.state, status.error)
    except JobNotFound:
        logger.info(
            "event=job_status_refused reason=unknown_job host_id=%s job_id=%s", host_id, status.job_id
        )
        return "unknown_job"
    except JobMoved:
        # Placed again elsewhere (or ended) since this host had it: its
        # report counts for nothing, as over HTTP (409). Logged by the model.
        return "moved"
    except JobStateConflict as exc:
        logger.info(
            "event=job_status_refused reason=conflict host_id=%s job_id=%s state=%s ended_as=%s",
            host_id,
            status.job_id,
            status.state,
            exc.state,
        )
        return "conflict"
    if not report.applied:
        return "repeat"
    logger.info("event=job_status job_id=%s island_id=%s state=%s", status.job_id, island.pk, report.state)
    return "applied"


def renew_lease(host_id: str, renewal: LeaseRenewal) -> LeaseOutcome:
    island = Island.objects.linked_host(host_id)
    if island is None:
        return "unknown_host"
    try:
        deadline = Job.objects.extend_lease(island, renewal.job_id, renewal.extend_seconds)
    except JobMoved:
        return "moved"
    except JobNotFound:
        return "unknown_job"
    return "refused" if deadline is None else "extended"


def _with_connection[T](fn: Callable[..., T], *args: Any) -> T:
    # Pool threads live as long as the bridge. Handing the connection back
    # around every call (CONN_MAX_AGE is 0) means a restarted database costs
    # one failed call, never a thread stuck with a dead connection.
    close_old_connections()
    try:
        return fn(*args)
    finally:
        close_old_connections()


# --- Connecting -----------------------------------------------------------------


def backoff(attempt: int) -> float:
    """Seconds to wait before connection attempt `attempt` + 1 (counting from 0)."""
    ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(attempt, 16))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 (jitter, not a secret)


def redact(url: str) -> str:
    """A server URL fit for logs: the shared credential stays out of them."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 4222}"


def _listening(servers: Iterable[str]) -> bool:
    for url in servers:
        parts = urlsplit(url)
        try:
            with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=2):
                return True
        except OSError:
            continue
    return False


# --- The JOBS stream -------------------------------------------------------------


def default_stream(prefix: str) -> str:
    """The stream's name: the agent's "JOBS", or one of the prefix's own.

    A bridge on a subject prefix (a test, a benchmark) never touches the
    real stream, even when it shares the server with it.
    """
    if not prefix:
        return STREAM
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix.strip(".")) + "_" + STREAM


def jobs_stream_config(name: str, subjects: "Subjects") -> StreamConfig:
    """The JOBS stream as the agent and the sender need it.

    Work-queue retention: the agent acks each AssignJob on receipt and it is
    gone, and a message no consumer takes waits for one (the agent binds
    its consumer when it starts). File storage, so a NATS restart keeps the
    jobs waiting. Deletions must stay allowed: they are how a job that moved
    on is taken back.
    """
    return StreamConfig(
        name=name,
        description="AssignJobs for Island agents (archipelag nats_bridge / nats_setup)",
        subjects=[subjects.of_hosts("jobs")],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=STREAM_MAX_AGE.total_seconds(),
        duplicate_window=DUPLICATE_WINDOW.total_seconds(),
        num_replicas=1,
    )


class StreamConflict(Exception):
    """The stream exists with settings that cannot be changed in place."""


@dataclass(frozen=True)
class StreamSetup:
    action: Literal["created", "updated", "unchanged", "outdated"]
    # What differed from what is needed, "field: had → needs", in words.
    changes: list[str] = field(default_factory=list)


def _duration(seconds: float) -> str:
    if not seconds:
        return "unlimited"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds / size
            return f"{count:g} {unit}{'' if count == 1 else 's'}"
    return f"{seconds:g} s"


async def setup_jobs_stream(jsm: JetStreamManager, wanted: StreamConfig, *, update: bool) -> StreamSetup:
    """Create the stream when missing; with `update`, bring an existing one up to what is needed.

    What is needed, not what is ideal: an existing stream that keeps
    messages longer, de-duplicates over a longer window or takes more
    subjects than asked is left as it is. Retention and storage cannot be
    changed in place (StreamConflict: delete the stream and run it again).
    """
    assert wanted.name is not None and wanted.subjects
    try:
        info = await jsm.stream_info(wanted.name)
    except NotFoundError:
        await jsm.add_stream(wanted)
        return StreamSetup("created")
    have = info.config
    if have.retention != wanted.retention or have.storage != wanted.storage:
        raise StreamConflict(
            f"stream {wanted.name} exists with {describe_stream(have)}; it needs "
            f"{describe_stream(wanted)}, and NATS cannot change retention or storage in place"
        )
    subjects = list(have.subjects or [])
    max_age, window = have.max_age or 0.0, have.duplicate_window or 0.0
    assert wanted.max_age is not None
    changes = []
    missing = [subject for subject in wanted.subjects if subject not in subjects]
    if missing:
        changes.append(f"subjects: {', '.join(subjects) or 'none'} → also {', '.join(missing)}")
        subjects += missing
    if max_age and max_age < wanted.max_age:
        changes.append(f"max_age: {_duration(max_age)} → {_duration(wanted.max_age)}")
        max_age = wanted.max_age
    if window < wanted.duplicate_window:
        changes.append(f"duplicate_window: {_duration(window)} → {_duration(wanted.duplicate_window)}")
        window = wanted.duplicate_window
    if not changes:
        return StreamSetup("unchanged")
    if not update:
        return StreamSetup("outdated", changes)
    have.subjects, have.max_age, have.duplicate_window = subjects, max_age, window
    await jsm.update_stream(have)
    return StreamSetup("updated", changes)


def describe_stream(config: StreamConfig) -> str:
    retention = getattr(config.retention, "value", config.retention)
    storage = getattr(config.storage, "value", config.storage)
    return (
        f"subjects {', '.join(config.subjects or [])}, {retention} retention, {storage} "
        f"storage, max_age {_duration(config.max_age or 0)}, "
        f"duplicate_window {_duration(config.duplicate_window or 0)}"
    )


# --- The outbox sender ------------------------------------------------------------------
#
# What the sender does with each kind of message (OutboxMessage.Kind):
# - ASSIGN: a JetStream publish into the stream with Nats-Msg-Id = msg_id
#   (job id and attempt); the PubAck's sequence is kept for a later DELETE.
#   A retried publish of a message already stored is dropped by the stream
#   and answered with the first copy's sequence (duplicate=true).
# - CANCEL: a core NATS publish on host.{id}.cancel. The agent subscribes to
#   it on core NATS and only while it runs: a cancel stored in a stream would
#   reach no one later, and the agent treats a repeat as a no-op (a cancel
#   for a job it is not running is logged and ignored). So de-duplication
#   would buy nothing, and durability comes from the DELETE instead: an
#   agent that missed the cancel never gets the AssignJob.
# - DELETE: removes the target AssignJob from the stream by its sequence,
#   after checking the message there is still the one with its msg_id (a
#   stream created anew numbers from 1 again). "No message found" means the
#   agent already took it, or it is gone: done either way.

type Send = Literal["sent", "retry", "wait", "give_up", "release"]


@dataclass
class SendResult:
    """What became of one claimed message, for record_sends() to write."""

    message: OutboxMessage
    outcome: Send
    stream_seq: int | None = None
    error: str = ""
    # Seconds until it may be taken again ("retry", "release", "wait").
    delay: float = 0.0


def claim_outbox(limit: int, claim_seconds: float) -> list[OutboxMessage]:
    now = timezone.now()
    return OutboxMessage.objects.claim(now, now + timedelta(seconds=claim_seconds), limit)


def settle_targets(deletes: list[OutboxMessage]) -> dict[int, tuple[str, OutboxMessage]]:
    now = timezone.now()
    return {delete.pk: OutboxMessage.objects.settle_target(delete, now) for delete in deletes}


def record_sends(results: list[SendResult]) -> list[SendResult]:
    """Write what became of a batch, in one transaction; return the AssignJobs withdrawn while in flight."""
    now = timezone.now()
    withdrawn = []
    with transaction.atomic():
        for result in results:
            message = result.message
            if result.outcome == "sent":
                if not OutboxMessage.objects.mark_sent(message, now, result.stream_seq):
                    withdrawn.append(result)
            elif result.outcome == "give_up":
                OutboxMessage.objects.give_up(message, now, result.error)
            else:
                OutboxMessage.objects.release(
                    message,
                    now,
                    tried=result.outcome == "retry",
                    delay=timedelta(seconds=result.delay),
                    error=result.error,
                )
    return withdrawn


def listen_params() -> dict[str, Any]:
    """psycopg connection arguments for the default database, for the sender's LISTEN."""
    params = dict(connections["default"].get_connection_params())
    # Django's own cursor class and adapters are for its synchronous connections.
    for name in ("cursor_factory", "context", "prepare_threshold"):
        params.pop(name, None)
    return params


def retry_delay(tries: int) -> float:
    ceiling = min(RETRY_MAX, RETRY_FIRST * 2 ** min(max(tries - 1, 0), 16))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 (jitter, not a secret)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


class OutboxSender:
    """Publishes the outbox: claim a batch, send it (no transaction open), record what happened.

    `step()` does one batch and is what tests call; `run()` repeats it,
    woken by PostgreSQL's NOTIFY or every `poll` seconds, until stopped.
    Messages of a batch go out concurrently; the batch's claims are taken
    in one short transaction and its outcomes written in another.
    """

    def __init__(
        self,
        nc: NATS,
        subjects: "Subjects",
        stream: str,
        counters: Counter[str],
        *,
        batch: int = OUTBOX_BATCH,
        claim_seconds: float = CLAIM_SECONDS,
        poll: float = OUTBOX_POLL,
        warn: Callable[..., None] | None = None,
    ):
        self.nc = nc
        self.subjects = subjects
        self.stream = stream
        self.counters = counters
        self.batch = batch
        self.claim_seconds = claim_seconds
        self.poll = poll
        self.js = nc.jetstream(timeout=PUBLISH_TIMEOUT)
        self.jsm = nc.jsm(timeout=PUBLISH_TIMEOUT)
        self.wake = asyncio.Event()
        self._warn = warn or (lambda kind, message, *args: logger.warning(message, *args))
        # One thread of its own: a backlog of heartbeat batches never delays a job.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="bridge-outbox")
        self._stream_ready = False
        self._stream_checked_at = -float("inf")

    async def _db[T](self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, _with_connection, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    # --- The stream ---

    async def ensure_stream(self) -> bool:
        """Create the stream when missing (at most every 10 s); True once it is there."""
        if self._stream_ready:
            return True
        if time.monotonic() - self._stream_checked_at < 10:
            return False
        self._stream_checked_at = time.monotonic()
        config = jobs_stream_config(self.stream, self.subjects)
        try:
            setup = await setup_jobs_stream(self.jsm, config, update=False)
        except StreamConflict as exc:
            logger.error("event=jobs_stream_unusable stream=%s error=%s", self.stream, exc)
            return False
        except (NatsError, TimeoutError) as exc:
            # No JetStream on the server, NATS away, or an API error.
            self._warn(
                "jobs_stream",
                "event=jobs_stream_unavailable stream=%s error=%r; is JetStream enabled (nats-server -js)?",
                self.stream,
                exc,
            )
            return False
        if setup.action == "created":
            logger.info("event=jobs_stream_created stream=%s %s", self.stream, describe_stream(config))
        elif setup.action == "outdated":
            logger.warning(
                "event=jobs_stream_outdated stream=%s changes=%r; run manage.py nats_setup",
                self.stream,
                "; ".join(setup.changes),
            )
        self._stream_ready = True
        return True

    # --- One batch ---

    async def step(self) -> int:
        """Claim, send and record one batch; return how many messages it claimed."""
        claimed = await self._db(claim_outbox, self.batch, self.claim_seconds)
        if not claimed:
            return 0
        self.counters["outbox_claimed"] += len(claimed)
        deletes = [message for message in claimed if message.kind == OutboxMessage.Kind.DELETE]
        targets = await self._db(settle_targets, deletes) if deletes else {}
        results = await asyncio.gather(*(self._send(message, targets.get(message.pk)) for message in claimed))
        try:
            withdrawn = await self._db(record_sends, list(results))
        except Exception:
            # Published but not recorded: the claims pass and a sender sends
            # them again under the same ids, which the stream de-duplicates.
            self.counters["outbox_record_failed"] += len(results)
            logger.exception("event=outbox_record_failed count=%d", len(results))
            return len(claimed)
        for result in results:
            self._count(result)
        for result in withdrawn:
            # Its job moved on while we published it, and the DELETE found
            # nothing yet: take back what we just published.
            self.counters["outbox_withdrawn_in_flight"] += 1
            assert result.stream_seq is not None
            with contextlib.suppress(NatsError):
                await self._delete_seq(result.message, result.stream_seq)
        return len(claimed)

    def _count(self, result: SendResult) -> None:
        kind = result.message.kind
        if result.outcome == "sent":
            self.counters["outbox_sent"] += 1
            self.counters[f"outbox_sent_{kind}"] += 1
        elif result.outcome == "retry":
            self.counters["outbox_failed"] += 1
            self._warn(
                f"outbox_failed_{kind}",
                "event=outbox_send_failed kind=%s msg_id=%s tries=%d retry_in=%.1fs error=%r",
                kind,
                result.message.msg_id,
                result.message.tries,
                result.delay,
                result.error,
            )
        elif result.outcome == "give_up":
            self.counters["outbox_given_up"] += 1
            logger.error(
                "event=outbox_given_up kind=%s msg_id=%s tries=%d reason=%r",
                kind,
                result.message.msg_id,
                result.message.tries,
                result.error,
            )
        elif result.outcome == "wait":
            self.counters["outbox_delete_waits"] += 1

    async def _send(self, message: OutboxMessage, target: tuple[str, OutboxMessage] | None) -> SendResult:
        now = timezone.now()
        age = now - message.created_at
        if message.kind == OutboxMessage.Kind.DELETE:
            if age > STREAM_MAX_AGE:
                return SendResult(message, "give_up", error="older than the stream keeps any message")
        elif age > RETRY_HORIZON:
            return SendResult(
                message, "give_up", error=f"not sent within {_duration(RETRY_HORIZON.total_seconds())}"
            )
        if not self.nc.is_connected:
            return SendResult(message, "release", error="not connected to NATS", delay=RETRY_FIRST)
        try:
            if message.kind == OutboxMessage.Kind.ASSIGN:
                return await self._publish_assign(message)
            if message.kind == OutboxMessage.Kind.CANCEL:
                await self._publish_cancel(message)
                return SendResult(message, "sent")
            assert target is not None
            return await self._carry_out_delete(message, *target)
        except OutboundBufferLimitError:
            # Disconnected since the check above. Nothing was sent: the
            # sender's connection keeps no buffer to send it later.
            return SendResult(message, "release", error="not connected to NATS", delay=RETRY_FIRST)
        except (NatsError, TimeoutError, OSError) as exc:
            # Some failures certainly stored nothing (no stream answered, an
            # API error), others may have (a timeout, a connection lost
            # mid-request); the claim counts in `tries` either way, which is
            # only ever cautious (a DELETE then looks for it in the stream).
            if isinstance(exc, NoStreamResponseError | ServiceUnavailableError):
                self._stream_ready = False
            return SendResult(message, "retry", error=_short(exc), delay=retry_delay(message.tries))

    async def _publish_assign(self, message: OutboxMessage) -> SendResult:
        if not await self.ensure_stream():
            return SendResult(
                message, "retry", error="the JOBS stream is not there", delay=retry_delay(message.tries)
            )
        ack = await self.js.publish(
            self.subjects.prefix + message.subject,
            message.payload.encode(),
            timeout=PUBLISH_TIMEOUT,
            # Refused unless this stream takes the subject: never stored elsewhere.
            stream=self.stream,
            headers={"Nats-Msg-Id": message.msg_id},
        )
        if ack.duplicate:
            # An earlier publish of it was stored (its sender died, or lost
            # the answer, before recording it): the agent gets that one.
            self.counters["outbox_duplicates"] += 1
        return SendResult(message, "sent", stream_seq=ack.seq)

    async def _publish_cancel(self, message: OutboxMessage) -> None:
        await self.nc.publish(self.subjects.prefix + message.subject, message.payload.encode())
        # nats-py writes a flush's PING ahead of publishes still queued, so
        # the first PONG can come before the server read the cancel; the
        # second PING goes out after it, so its PONG means the server has it.
        await self.nc.flush(timeout=int(PUBLISH_TIMEOUT))
        await self.nc.flush(timeout=int(PUBLISH_TIMEOUT))

    async def _carry_out_delete(
        self, message: OutboxMessage, state: str, target: OutboxMessage
    ) -> SendResult:
        if state == "in_flight":
            # A sender is publishing it now; once it records the sequence, delete that.
            return SendResult(message, "wait", delay=DELETE_WAIT)
        if state == "sent":
            assert target.stream_seq is not None
            await self._delete_seq(target, target.stream_seq)
        elif state == "unknown":
            # A send of it failed or was cut short: find it by its id, if it is there.
            seq = await self._find(target)
            if seq is not None:
                await self._delete_seq(target, seq)
        return SendResult(message, "sent")

    async def _delete_seq(self, assign: OutboxMessage, seq: int) -> bool:
        """Delete `assign` from the stream at `seq`, if it is still there; True if this removed it."""
        try:
            stored = await self.jsm.get_msg(self.stream, seq)
        except NotFoundError:
            return False  # the agent took it (work queue), or it aged out
        if (stored.headers or {}).get("Nats-Msg-Id") != assign.msg_id:
            return False  # another message: the stream was made anew since
        try:
            await self.jsm.delete_msg(self.stream, seq)
        except APIError as exc:
            if exc.err_code == 10057:  # JSStreamMsgDeleteFailed: "no message found" (taken meanwhile)
                return False
            raise
        self.counters["outbox_deleted_from_stream"] += 1
        return True

    async def _find(self, assign: OutboxMessage) -> int | None:
        """The sequence of `assign` in the stream, if a publish of it was stored and is still waiting."""
        subject = self.subjects.prefix + assign.subject
        seq = 1
        for _ in range(FIND_LIMIT):
            try:
                stored = await self.jsm.get_msg(self.stream, seq, subject=subject, next=True)
            except NotFoundError:
                return None
            assert stored.seq is not None
            if (stored.headers or {}).get("Nats-Msg-Id") == assign.msg_id:
                return stored.seq
            seq = stored.seq + 1
        raise NatsError(f"{assign.msg_id} not found among the first {FIND_LIMIT} messages of {subject}")

    # --- The loop ---

    async def run(self, stop: asyncio.Event) -> None:
        """Send until `stop` is set, then finish the batch in hand (a claim never outlives its sender)."""
        listener = asyncio.create_task(self.listen(stop))
        await self.ensure_stream()
        failures = 0
        try:
            while not stop.is_set():
                # Cleared before the claim: a NOTIFY arriving during the batch wakes the next one.
                self.wake.clear()
                claimed = 0
                if self.nc.is_connected:
                    try:
                        claimed = await self.step()
                        failures = 0
                    except Exception:
                        failures += 1
                        self.counters["outbox_step_failed"] += 1
                        logger.exception("event=outbox_step_failed; retrying")
                        await self._pause(stop, retry_delay(failures))
                        continue
                if claimed >= self.batch:
                    continue  # more is waiting
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=self.poll)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)

    async def listen(self, stop: asyncio.Event) -> None:
        """Set `wake` on every NOTIFY of a new outbox message; reconnect when the connection drops."""
        if connections["default"].vendor != "postgresql":
            return  # SQLite has no NOTIFY: the poll alone
        params = listen_params()
        attempt = 0
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(**params, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {OUTBOX_CHANNEL}")
                    if attempt:
                        logger.info("event=outbox_listening_again")
                    attempt = 0
                    # Messages written while we were not listening woke no one.
                    self.wake.set()
                    async for _ in conn.notifies():
                        self.wake.set()
            except Exception as exc:  # a dropped connection, a restart: poll meanwhile, listen again
                self.counters["outbox_listen_errors"] += 1
                self._warn("outbox_listen", "event=outbox_listen_failed error=%r; polling meanwhile", exc)
            await self._pause(stop, backoff(attempt))
            attempt += 1


# --- The bridge -------------------------------------------------------------------


class Bridge:
    """One bridge process's state: its NATS connection, pending heartbeats and counters."""

    def __init__(
        self,
        servers: list[str],
        *,
        prefix: str = "",
        queue: str = QUEUE_GROUP,
        batch_size: int = BATCH_SIZE,
        flush_interval: float = FLUSH_INTERVAL,
        stats_interval: float = STATS_INTERVAL,
        writers: int = WRITERS,
        stream: str | None = None,
        outbox_batch: int = OUTBOX_BATCH,
        claim_seconds: float = CLAIM_SECONDS,
        outbox_poll: float = OUTBOX_POLL,
    ):
        self.servers = servers
        self.subjects = Subjects(prefix)
        self.stream = stream or default_stream(prefix)
        self.outbox_batch = outbox_batch
        self.claim_seconds = claim_seconds
        self.outbox_poll = outbox_poll
        # Set once the outbox sender runs (after NATS answered).
        self.sender: OutboxSender | None = None
        self.queue = queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.stats_interval = stats_interval
        self.counters: Counter[str] = Counter()
        # Set once subscribed, for whoever waits on the bridge from another thread.
        self.ready = threading.Event()
        self.writers = writers
        # Threads for the writers, and two more so pairing and job states
        # never wait behind heartbeat batches.
        self._executor = ThreadPoolExecutor(writers + 2, thread_name_prefix="bridge-db")
        self._pending: dict[str, Beat] = {}
        # (when it arrived, the request), oldest first; answered from the right.
        self._pairing: deque[tuple[float, Message]] = deque(maxlen=PAIRING_BACKLOG)
        self._pairing_waiting: asyncio.Event | None = None
        self._subscriptions: list[Subscription] = []
        self._last_warned: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._has_beats: asyncio.Event | None = None
        self._batch_full: asyncio.Event | None = None
        self._heartbeat_decoder = msgspec.json.Decoder(EnhancedHeartbeat)
        self._status_decoder = msgspec.json.Decoder(JobStatus)
        self._lease_decoder = msgspec.json.Decoder(LeaseRenewal)
        self._registration_decoder = msgspec.json.Decoder(HostRegistration)
        self._encoder = msgspec.json.Encoder()

    # --- Running and stopping ---

    async def run(self) -> None:
        """Connect (waiting for NATS as long as it takes), serve until stop(), then drain."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._has_beats = asyncio.Event()
        self._batch_full = asyncio.Event()
        self._pairing_waiting = asyncio.Event()
        try:
            nc = await self._connect()
            if nc is None:
                return
            sender_nc = await self._connect(
                "archipelag-outbox-sender",
                # A publish while disconnected fails at once instead of
                # waiting in nats-py's buffer to go out after a reconnect,
                # perhaps hours later: past the give-up (RETRY_HORIZON) and
                # the stream's duplicate window.
                pending_size=0,
                disconnected_cb=self._on_sender_disconnected,
                reconnected_cb=self._on_sender_reconnected,
            )
            if sender_nc is None:
                await nc.close()
                return
            # Its own connection: AssignJobs never queue behind thousands of
            # heartbeats on one socket, and its publishes are never buffered.
            self.sender = OutboxSender(
                sender_nc,
                self.subjects,
                self.stream,
                self.counters,
                batch=self.outbox_batch,
                claim_seconds=self.claim_seconds,
                poll=self.outbox_poll,
                warn=self.warn,
            )
            sending = asyncio.create_task(self.sender.run(self._stop))
            await self._subscribe(nc)
            flusher = asyncio.create_task(self._flush_loop())
            pairing = [asyncio.create_task(self._pairing_loop()) for _ in range(PAIRING_WORKERS)]
            stats = asyncio.create_task(self._stats_loop())
            await self._stop.wait()
            # Pairing first: take no more requests, answer those still fresh
            # while the connection is up, then drain the rest.
            with contextlib.suppress(NatsError):
                await self._subscriptions[0].drain()  # type: ignore[no-untyped-call]
            self._pairing_waiting.set()
            await asyncio.gather(*pairing)
            await self._drain(nc)
            # The subscriptions are drained: every heartbeat received is pending
            # now. The flusher writes them and ends once nothing is left.
            self._has_beats.set()
            self._batch_full.set()
            await flusher
            # The sender finishes the batch in hand and records it; what it
            # has not claimed waits in the outbox for the next sender.
            await sending
            self.sender.close()
            await sender_nc.close()
            stats.cancel()
        finally:
            self._executor.shutdown(wait=True)
            self.log_stats("bridge_stopped")

    def stop(self) -> None:
        """Ask the bridge to drain and stop; call it in the bridge's event loop."""
        if self._stop is not None:
            self._stop.set()
        if self.sender is not None:
            self.sender.wake.set()

    def stop_threadsafe(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.stop)

    async def _connect(self, name: str = "archipelag-nats-bridge", **options: Any) -> NATS | None:
        """Wait until a server listens, then connect; None if stopped first.

        nats-py retries a failed first connect only at a fixed pace, so the
        bridge waits with backoff until something listens, and from then on
        nats-py reconnects forever (with the same backoff, through
        reconnect_to_server_handler) and replays the subscriptions.
        """
        assert self._stop is not None
        attempt = 0
        where = ", ".join(redact(url) for url in self.servers)
        while not await asyncio.to_thread(_listening, self.servers):
            delay = backoff(attempt)
            if attempt == 0 or attempt % 10 == 0:
                logger.warning(
                    "event=nats_unreachable servers=%s retry_in=%.1fs attempt=%d", where, delay, attempt + 1
                )
            attempt += 1
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
                return None
            except TimeoutError:
                continue
        nc = NATS()
        settings: dict[str, Any] = {
            "servers": self.servers,
            "name": name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": BACKOFF_FIRST,
            "reconnect_to_server_handler": self._reconnect_to,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        connecting = asyncio.create_task(nc.connect(**(settings | options)))
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            await nc.close()
            return None
        connecting.result()
        logger.info("event=nats_connected name=%s servers=%s", name, where)
        return nc

    async def _subscribe(self, nc: NATS) -> None:
        # Pairing first: run() drains it before the others.
        handlers: list[tuple[str, Callable[[Any], Any]]] = [
            (self.subjects.pairing, self.enqueue_pairing),
            (self.subjects.register, self.on_register),
            (self.subjects.of_hosts("heartbeat"), self.on_heartbeat),
            (self.subjects.of_hosts("status"), self.on_status),
            (self.subjects.of_hosts("lease"), self.on_lease),
            (self.subjects.of_hosts("ping"), self.on_ping),
        ]
        self._subscriptions = [
            await nc.subscribe(subject, queue=self.queue, cb=handler) for subject, handler in handlers
        ]
        await nc.flush()
        logger.info(
            "event=bridge_ready queue=%s subjects=%s batch_size=%d flush_ms=%d",
            self.queue,
            ",".join(subject for subject, _ in handlers),
            self.batch_size,
            int(self.flush_interval * 1000),
        )
        self.ready.set()

    async def _drain(self, nc: NATS) -> None:
        """Stop taking messages but handle every one already delivered, then close."""
        logger.info("event=bridge_draining")
        # nats-py refuses to drain while reconnecting; give a reconnect a moment.
        for _ in range(50):
            if not nc.is_reconnecting:
                break
            await asyncio.sleep(0.1)
        try:
            await nc.drain()
        except (ConnectionClosedError, ConnectionReconnectingError) as exc:
            logger.warning("event=nats_drain_failed error=%r; closing", exc)
            await nc.close()

    def _reconnect_to(self, servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
        server = min(servers, key=lambda server: server.reconnects)
        return server, backoff(server.reconnects)

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            # The client dropped messages because a handler fell behind.
            self.counters["slow_consumer_drops"] += 1
            self.warn("slow_consumer", "event=nats_slow_consumer subject=%s", exc.subject)
            return
        self.counters["nats_errors"] += 1
        self.warn("nats_error", "event=nats_error error=%r", exc)

    async def _on_disconnected(self) -> None:
        if self._stop is not None and self._stop.is_set():
            return  # our own drain closed the connection
        self.counters["disconnects"] += 1
        logger.warning("event=nats_disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        self.counters["reconnects"] += 1
        logger.info("event=nats_reconnected")

    async def _on_sender_disconnected(self) -> None:
        if self._stop is not None and self._stop.is_set():
            return
        self.counters["outbox_disconnects"] += 1
        logger.warning("event=outbox_nats_disconnected; the outbox waits for NATS")

    async def _on_sender_reconnected(self) -> None:
        logger.info("event=outbox_nats_reconnected")
        if self.sender is not None:
            self.sender.wake.set()

    # --- Bookkeeping ---

    def warn(self, kind: str, message: str, *args: Any) -> None:
        """Log a warning of this kind unless one was logged in the last WARN_EVERY seconds."""
        now = time.monotonic()
        if now - self._last_warned.get(kind, -WARN_EVERY) >= WARN_EVERY:
            self._last_warned[kind] = now
            logger.warning(message, *args)

    def reject(self, kind: str, subject: str, reason: str) -> None:
        self.counters[f"rejected_{kind}"] += 1
        self.warn(
            kind,
            "event=nats_message_rejected kind=%s subject=%s reason=%r",
            kind,
            subject[:200],
            reason[:200],
        )

    def log_stats(self, event: str = "bridge_stats") -> None:
        pairs = " ".join(f"{name}={count}" for name, count in sorted(self.counters.items()))
        logger.info("event=%s pending=%d %s", event, len(self._pending), pairs)

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.stats_interval)
            self.log_stats()

    async def _db[T](self, fn: Callable[..., T], *args: Any) -> T:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._executor, _with_connection, fn, *args)

    def _decode[T](
        self, decoder: msgspec.json.Decoder[T], msg: Message, kind: str, max_bytes: int
    ) -> T | None:
        try:
            return decode_body(msg.data, decoder, max_bytes)
        except InvalidBody as exc:
            problem = "too_large" if exc.status == 413 else "malformed"
            self.reject(f"{kind}_{problem}", msg.subject, str(exc))
            return None

    async def _reply(self, msg: Message, answer: PairingAnswer) -> None:
        try:
            await msg.respond(self._encoder.encode(answer))
        except Exception as exc:  # a closed connection or a bad inbox must not stop the bridge
            self.counters["reply_failed"] += 1
            self.warn("reply_failed", "event=nats_reply_failed subject=%s error=%r", msg.subject, exc)

    # --- Handlers: one per subject, each swallowing whatever its input does ---

    async def enqueue_pairing(self, msg: Message) -> None:
        """The pairing subscription's callback: queue the request, stamped, for _pairing_loop."""
        if len(self._pairing) == PAIRING_BACKLOG:
            self.counters["pairing_dropped"] += 1
        self._pairing.append((time.monotonic(), msg))
        if self._pairing_waiting is not None:
            self._pairing_waiting.set()

    async def _pairing_loop(self) -> None:
        """Answer queued pairing requests, skipping those nobody waits for any more."""
        assert self._pairing_waiting is not None and self._stop is not None
        while True:
            if not self._pairing:
                if self._stop.is_set():
                    return
                self._pairing_waiting.clear()
                await self._pairing_waiting.wait()
                continue
            arrived, msg = self._pairing.pop()
            if time.monotonic() - arrived > PAIRING_STALE:
                self.counters["pairing_requests"] += 1
                self.counters["pairing_stale"] += 1
                continue
            await self.on_pairing(msg)

    async def on_pairing(self, msg: Message) -> None:
        """Answer one pairing request (the agent's `coordinator.hosts.pairing`)."""
        self.counters["pairing_requests"] += 1
        if not msg.reply:
            # Nobody would see the code: not worth drawing one.
            self.reject("pairing_without_reply", msg.subject, "a pairing request needs a reply subject")
            return
        try:
            registration = decode_body(msg.data, self._registration_decoder)
        except InvalidBody as exc:
            problem = "too_large" if exc.status == 413 else "malformed"
            self.reject(f"pairing_{problem}", msg.subject, str(exc))
            await self._reply(msg, {"success": False, "error": str(exc)})
            return
        try:
            outcome, answer = await self._db(request_code, registration)
        except Exception:
            logger.exception("event=pairing_failed host_id=%s", registration.host_id)
            outcome, answer = (
                "failed",
                {"success": False, "error": "the coordinator could not issue a code; try again later"},
            )
        self.counters[f"pairing_{outcome}"] += 1
        await self._reply(msg, answer)

    async def on_register(self, msg: Message) -> None:
        self.counters["registrations"] += 1
        registration = self._decode(self._registration_decoder, msg, "register", DEFAULT_MAX_BODY_BYTES)
        if registration is None:
            return
        try:
            linked = await self._db(register, registration)
        except Exception:
            self.counters["register_failed"] += 1
            logger.exception("event=register_failed host_id=%s", registration.host_id)
            return
        self.counters["register_linked" if linked else "register_unlinked"] += 1

    async def on_heartbeat(self, msg: Message) -> None:
        received_at = timezone.now()
        self.counters["heartbeats_received"] += 1
        host_id = self.subjects.host_id(msg.subject, "heartbeat")
        if host_id is None:
            self.reject("heartbeat_subject", msg.subject, "the subject names no valid host_id")
            return
        heartbeat = self._decode(self._heartbeat_decoder, msg, "heartbeat", HEARTBEAT_MAX_BODY_BYTES)
        if heartbeat is None:
            return
        self.enqueue_heartbeat(Beat(heartbeat, received_at, host_id=host_id))

    def enqueue_heartbeat(self, beat: Beat) -> None:
        host_id = beat.host_id
        assert host_id is not None
        waiting = self._pending.get(host_id)
        if waiting is not None:
            # One beat per host waits: the one the write would keep anyway.
            self.counters["heartbeats_superseded"] += 1
            beat = newest(waiting, beat)
        elif len(self._pending) >= MAX_PENDING_HOSTS:
            self.counters["heartbeats_dropped_backlog"] += 1
            self.warn("backlog", "event=heartbeat_backlog_full hosts=%d", len(self._pending))
            return
        self._pending[host_id] = beat
        if self._has_beats is not None and self._batch_full is not None:
            self._has_beats.set()
            if len(self._pending) >= self.batch_size:
                self._batch_full.set()

    async def on_status(self, msg: Message) -> None:
        self.counters["statuses_received"] += 1
        host_id = self.subjects.host_id(msg.subject, "status")
        if host_id is None:
            self.reject("status_subject", msg.subject, "the subject names no valid host_id")
            return
        status = self._decode(self._status_decoder, msg, "status", DEFAULT_MAX_BODY_BYTES)
        if status is None:
            return
        if status.job_id is None:
            self.reject("status_malformed", msg.subject, "invalid job_id: required over NATS")
            return
        try:
            outcome = await self._apply_status(host_id, status)
        except Exception:
            self.counters["status_failed"] += 1
            logger.exception("event=job_status_failed host_id=%s job_id=%s", host_id, status.job_id)
            return
        self.counters[f"status_{outcome}"] += 1

    async def _apply_status(self, host_id: str, status: JobStatus) -> StatusOutcome:
        """apply_job_status, tried again on a new connection if the database dropped ours."""
        attempt = 1
        while True:
            try:
                return await self._db(apply_job_status, host_id, status)
            except TRANSIENT_DATABASE_ERRORS as exc:
                if attempt == STATUS_ATTEMPTS:
                    raise
                self.counters["status_retries"] += 1
                logger.warning(
                    "event=job_status_retry host_id=%s job_id=%s attempt=%d error=%s",
                    host_id,
                    status.job_id,
                    attempt,
                    type(exc).__name__,
                )
                await asyncio.sleep(STATUS_RETRY_FIRST * 2 ** (attempt - 1))
                attempt += 1

    async def on_lease(self, msg: Message) -> None:
        self.counters["leases_received"] += 1
        host_id = self.subjects.host_id(msg.subject, "lease")
        if host_id is None:
            self.reject("lease_subject", msg.subject, "the subject names no valid host_id")
            return
        renewal = self._decode(self._lease_decoder, msg, "lease", DEFAULT_MAX_BODY_BYTES)
        if renewal is None:
            return
        try:
            outcome = await self._db(renew_lease, host_id, renewal)
        except Exception:
            self.counters["lease_failed"] += 1
            logger.exception("event=lease_failed host_id=%s job_id=%s", host_id, renewal.job_id)
            return
        self.counters[f"lease_{outcome}"] += 1

    async def on_ping(self, msg: Message) -> None:
        # The agent measures its round trip with this; the body does not matter.
        self.counters["pings"] += 1
        if msg.reply:
            try:
                await msg.respond(b"pong")
            except Exception:
                self.counters["reply_failed"] += 1

    # --- Heartbeat batches ---

    async def _flush_loop(self) -> None:
        """Write a batch whenever `batch_size` hosts are waiting or the oldest waited `flush_interval`.

        Up to `writers` batches are written at once, so one batch's Python
        work overlaps another's wait for PostgreSQL; while they are written
        the next batch gathers, so batches grow by themselves when the
        database is the bottleneck. Two batches never hold the same host's
        beat, and record_heartbeats drops a beat older than the one recorded,
        so the order batches commit in does not matter.
        """
        assert self._stop is not None and self._has_beats is not None and self._batch_full is not None
        slots = asyncio.Semaphore(self.writers)
        in_flight: set[asyncio.Task[bool]] = set()

        async def write(batch: list[Beat]) -> bool:
            try:
                return await self.write(batch)
            finally:
                slots.release()

        while True:
            await self._has_beats.wait()
            if not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._batch_full.wait(), timeout=self.flush_interval)
            await slots.acquire()
            batch = self.take_batch()
            if batch:
                task = asyncio.create_task(write(batch))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            else:
                slots.release()
            if self._stop.is_set() and not self._pending:
                # Stopping, and every beat received is in a batch: wait for them.
                # A batch the database refused now is lost, and logged as such.
                written = await asyncio.gather(*in_flight)
                if self._pending and all(written):
                    continue
                if self._pending:
                    self.counters["heartbeats_lost_at_stop"] += len(self._pending)
                    logger.error("event=heartbeats_lost_at_stop count=%d", len(self._pending))
                return

    def take_batch(self) -> list[Beat]:
        """Take up to MAX_BATCH waiting heartbeats, oldest host first."""
        assert self._has_beats is not None and self._batch_full is not None
        hosts = list(itertools.islice(self._pending, MAX_BATCH))
        batch = [self._pending.pop(host_id) for host_id in hosts]
        if not self._pending:
            self._has_beats.clear()
        if len(self._pending) < self.batch_size:
            self._batch_full.clear()
        return batch

    async def write(self, batch: list[Beat]) -> bool:
        """Write one batch in one transaction; False (and the beats back in line) if the database failed."""
        assert self._has_beats is not None
        try:
            outcomes = await self._db(record_heartbeats, batch)
        except Exception:
            logger.exception("event=heartbeat_batch_failed size=%d; retrying", len(batch))
            self.counters["heartbeat_batches_failed"] += 1
            # Put them back, keeping a newer beat the same host sent meanwhile.
            for beat in batch:
                assert beat.host_id is not None
                waiting = self._pending.get(beat.host_id)
                self._pending[beat.host_id] = beat if waiting is None else newest(beat, waiting)
            self._has_beats.set()
            await asyncio.sleep(1.0)
            return False
        self.counters["heartbeat_batches"] += 1
        tally = Counter(outcomes)
        self.counters["heartbeats_applied"] += tally[HeartbeatOutcome.ACCEPTED]
        # Unknown, unlinked or removed hosts, and the rare beat older than
        # one already recorded: counted, never written.
        self.counters["heartbeats_not_applied"] += len(batch) - tally[HeartbeatOutcome.ACCEPTED]
        if wrong := tally[HeartbeatOutcome.WRONG_HOST]:
            # One host speaking for another: a bug or a forgery. Neither counts.
            self.counters["rejected_heartbeat_host_mismatch"] += wrong
            self.warn(
                "heartbeat_host_mismatch",
                "event=nats_message_rejected kind=heartbeat_host_mismatch count=%d",
                wrong,
            )
        return True
