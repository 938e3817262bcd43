import enum
import functools
import hmac
import logging
import operator
import random
import re
import secrets
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any

import msgspec
import psycopg
from django.conf import settings
from django.db import IntegrityError, connections, models, transaction
from django.db.models import (
    BooleanField,
    Case,
    Count,
    DecimalField,
    F,
    FloatField,
    Q,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.base import ModelState
from django.db.models.expressions import RawSQL
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast, Coalesce
from django.utils import timezone

from archipelag.channel_layer import send_to_groups
from archipelag.secrets import generate_secret, hash_secret
from islands import signals
from islands.agent import Capabilities, EnhancedHeartbeat
from islands.signals import job_finished

# The one import from an app above this one (listed in pyproject.toml's
# import contract): the score's bounds and starting value are karma's rules.
from karma import rules as karma_rules

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger("archipelag.islands")

# Desktop tokens live until the Island is removed; phones get 30-day tokens
# and pair again when one runs out, as the public app does.
MOBILE_TOKEN_TTL = timedelta(days=30)
TOKEN_PREFIX = "isl_"  # noqa: S105 (a prefix, not a secret)
# What a desktop or server runs when its heartbeats do not say (the agent
# itself always reports these two); a phone runs the one runtime its app
# reported when pairing, CoreML on iOS and ONNX on Android.
DESKTOP_RUNTIMES = ("container", "wasm")
# A runtime name kept in Island.runtimes: what the agent reports, lower case.
RUNTIME_NAME = re.compile(r"[a-z0-9_-]{1,32}")
# How many overdue Islands (and jobs) one watcher step handles; the next
# step continues where it stopped.
WATCH_BATCH = 500
DISPATCHER_KEY_PREFIX = "dsp_"
# Island keys (per-Island NATS credentials). The username prefix tells the
# auth callout at a glance that a connection claims to be a keyed Island.
ISLAND_KEY_USER_PREFIX = "isl-"
ISLAND_KEY_UNUSED_TTL = timedelta(hours=24)
ISLAND_KEY_BATCH_MAX = 100
# Agents send whole stack traces as errors; the ledger keeps the start.
JOB_ERROR_MAX_LENGTH = 2000
# An Island renews the lease of a job it is running (NATS `host.{id}.lease`,
# the agent asks for 60 s every 30 s). One renewal reaches at most this far
# ahead, and none carries a job past the longest lease a dispatcher may give.
LEASE_RENEWAL_MAX = timedelta(minutes=5)
JOB_LEASE_MAX = timedelta(days=7)
# The fleet summary's earnings: the last 7 days.
FLEET_EARNINGS_WINDOW = timedelta(days=7)
# Credits carry four decimal places; a job pays at most this much.
CREDITS_PLACES = Decimal("0.0001")
MAX_JOB_CREDITS = Decimal("99999999")

# Columns kept by the job ledger and the karma ledger, each changed only by
# its own UPDATE in the transaction that records the change (see Island.save).
LEDGER_FIELDS = frozenset({"jobs_completed", "jobs_failed", "earnings", "karma", "jobs_running"})
# What an Island its owner removed keeps when its host pairs with the same
# account again (IslandManager.link): who it is and what it did. Everything
# else is taken from the new pairing, as a new Island would have it.
KEPT_ON_RETURN = LEDGER_FIELDS | {
    "id",
    "owner",
    "host_id",
    "name",
    "suspended_at",
    "status",
    "last_heartbeat_at",
    "offline_after",
    "draw_next",
    "draw_consumed",
}
# The columns a heartbeat may change; record_heartbeats writes exactly these.
HEARTBEAT_FIELDS = [
    "status",
    "last_heartbeat_at",
    "offline_after",
    "metrics",
    "supported_runtimes",
    "asking_prices",
    "runtimes",
    "capacity",
    "may_work",
    "agent_version",
    "gpu_model",
    "gpu_vram_mb",
    "cpu_cores",
    "ram_mb",
    "region",
    "device_model",
    "os_version",
    "runtime",
    "accelerator",
]
# Of those, the ones every heartbeat replaces whatever they held.
HEARTBEAT_REPLACES = frozenset(
    {"metrics", "supported_runtimes", "asking_prices", "runtimes", "capacity", "may_work"}
)
# What a heartbeat batch's locking read loads of each Island: what a
# heartbeat reads or may keep, and the name, which save() checks. Every
# heartbeat replaces the JSON columns, so they are not read.
HEARTBEAT_READS = (
    "id",
    "host_id",
    "name",
    "token_hash",
    "kind",
    "owner_id",
    *(name for name in HEARTBEAT_FIELDS if name not in HEARTBEAT_REPLACES),
)
# What Island.runtimes is derived from.
RUNTIME_SOURCES = frozenset({"kind", "runtime", "supported_runtimes"})


def hash_token(token: str) -> str | None:
    """The stored hash of an Island API token, or None when it cannot be one."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    return hash_secret(token)


def gigabytes(megabytes: int | None) -> str:
    """24576 -> "24 GB"; what the agent reports in MB reads better in GB."""
    if megabytes is None:
        return ""
    return f"{round(megabytes / 1024, 1):g} GB"


def offline_threshold() -> timedelta:
    """How long after its last heartbeat an Island still counts as online."""
    return timedelta(seconds=settings.ISLAND_OFFLINE_AFTER)


class LedgerFieldWrite(Exception):
    """A save() that would write a ledger column; those change only through their ledgers."""


# --- Heartbeats ------------------------------------------------------------------


class HeartbeatOutcome(enum.Enum):
    """What became of one beat given to Island.objects.record_heartbeats."""

    # Written: the Island's row now holds this beat.
    ACCEPTED = "accepted"
    # Older than a beat the Island already has (recorded, or later in the
    # same batch): nothing written, and nothing wrong with it either.
    STALE = "stale"
    # No active Island holds this token (unknown, revoked, expired or
    # removed), or, over NATS, no active Island has this host id.
    UNAUTHORIZED = "unauthorized"
    # The body names a host other than the Island's: nothing written for it.
    WRONG_HOST = "wrong_host"
    # The transport could not read the body (it answers why); the Island is
    # known, and nothing was written.
    UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True)
class Beat:
    """One heartbeat as a transport received it.

    It names its Island by the hash of the API token it came with (HTTP) or
    by the host id of its subject (NATS), never both. `heartbeat` is None when
    the transport refused the body and only wants to know whether the token
    is good, so that an unknown token is told so first, as on every endpoint.
    """

    heartbeat: EnhancedHeartbeat | None
    received_at: datetime
    token_hash: str | None = None
    host_id: str | None = None


def newest(earlier: Beat, later: Beat) -> Beat:
    """Of two beats of one Island, the one that counts: the later received.

    `later` is the one that arrived second; on a tie it wins. The one rule
    for which heartbeat wins, wherever beats of one Island meet (a batch,
    the NATS bridge's waiting beats).
    """
    return earlier if earlier.received_at > later.received_at else later


def _holds_token(token_hashes: str | Iterable[str], now: datetime) -> Q:
    hashes = [token_hashes] if isinstance(token_hashes, str) else list(token_hashes)
    return Q(token_hash__in=hashes) & (Q(token_expires_at__isnull=True) | Q(token_expires_at__gt=now))


def fleet_group(owner_id: int) -> str:
    """The Channels group of one account's open "Your Islands" pages (islands/consumers.py)."""
    return f"fleet.{owner_id}"


def announce_fleet(changed: Iterable[tuple[int, Any]]) -> None:
    """Tell the owners' open "Your Islands" pages which of their Islands changed, on commit.

    `changed` holds (owner id, Island id) pairs. Called for status
    transitions and ended jobs only, never for a plain heartbeat, so the
    heartbeat path sends nothing while nothing changes. The message names
    the Islands; the page reads their state from the database (the channel
    layer is at-most-once, the database is the truth). Robust: a channel
    layer that is down loses the live update, not the change, and the page
    finds it by polling.
    """
    by_owner: dict[int, list[str]] = {}
    for owner_id, island_id in changed:
        by_owner.setdefault(owner_id, []).append(str(island_id))
    if not by_owner:
        return
    messages = {
        fleet_group(owner_id): {"type": "fleet.changed", "islands": sorted(set(ids))}
        for owner_id, ids in by_owner.items()
    }
    transaction.on_commit(lambda: send_to_groups(messages), robust=True)


@dataclass(frozen=True, slots=True)
class FleetSummary:
    """The line above an owner's Islands (IslandQuerySet.summary)."""

    total: int
    online: int
    completed_today: int
    failed_today: int
    earned_last_7_days: Decimal


class IslandQuerySet(models.QuerySet["Island"]):
    def active(self) -> "IslandQuerySet":
        return self.filter(removed_at__isnull=True)

    def owned_by(self, user: "User") -> "IslandQuerySet":
        return self.active().filter(owner=user)

    def shown_as(self, status: "Island.LiveStatus", now: datetime) -> "IslandQuerySet":
        """Islands that `Island.status_at(now)` would show as `status`, in SQL (for filters)."""
        present = self.filter(removed_at__isnull=True, suspended_at__isnull=True)
        match status:
            case Island.LiveStatus.REMOVED:
                return self.filter(removed_at__isnull=False)
            case Island.LiveStatus.SUSPENDED:
                return self.filter(removed_at__isnull=True, suspended_at__isnull=False)
            case Island.LiveStatus.SIGNED_OFF:
                return present.filter(status=Island.Status.SIGNED_OFF)
            case Island.LiveStatus.NEW:
                return present.exclude(status=Island.Status.SIGNED_OFF).filter(last_heartbeat_at__isnull=True)
            case Island.LiveStatus.ONLINE:
                return self.filter(self.online_condition(now))
            case Island.LiveStatus.OFFLINE:
                return present.exclude(status=Island.Status.SIGNED_OFF).filter(
                    Q(offline_after__isnull=True) | Q(offline_after__lte=now), last_heartbeat_at__isnull=False
                )

    def summary(self, now: datetime) -> "FleetSummary":
        """Online of total, jobs ended today (UTC) and earnings of the last 7 days: two queries.

        Earnings count the attempts that succeeded in the window, each at
        the credits it paid (the same sum `earnings` keeps for all time).
        """
        counts = self.aggregate(
            total=Count("pk"),
            online=Count("pk", filter=self.online_condition(now)),
        )
        today = now.replace(hour=0, minute=0, second=0, microsecond=0)
        week_ago = now - FLEET_EARNINGS_WINDOW
        failed = [Attempt.Outcome.FAILED, Attempt.Outcome.TIMED_OUT]
        attempts = Attempt.objects.filter(island__in=self.values("pk"), finished_at__gte=min(today, week_ago))
        jobs = attempts.aggregate(
            completed=Count("pk", filter=Q(outcome=Attempt.Outcome.SUCCEEDED, finished_at__gte=today)),
            failed=Count("pk", filter=Q(outcome__in=failed, finished_at__gte=today)),
            earned=Sum("credits", filter=Q(outcome=Attempt.Outcome.SUCCEEDED, finished_at__gte=week_ago)),
        )
        return FleetSummary(
            total=counts["total"],
            online=counts["online"],
            completed_today=jobs["completed"],
            failed_today=jobs["failed"],
            earned_last_7_days=jobs["earned"] or Decimal(0),
        )

    @staticmethod
    def online_condition(now: datetime) -> Q:
        """The SQL twin of `status_at(now) == ONLINE`."""
        return Q(removed_at__isnull=True, suspended_at__isnull=True, offline_after__gt=now) & ~Q(
            status=Island.Status.SIGNED_OFF
        )

    def online(self, now: datetime | None = None) -> "IslandQuerySet":
        """Islands shown as online at `now` (see Island.status_at), e.g. for routing."""
        return self.shown_as(Island.LiveStatus.ONLINE, now or timezone.now())

    def can_run(self, runtime: str) -> "IslandQuerySet":
        """Active Islands able to run cargos built for `runtime`, online or not.

        Placement combines this with its other rules (see ELIGIBILITY).
        """
        return self.active().filter(runtimes__contains=f" {runtime.lower()} ")

    def holding_token(self, token_hashes: str | Iterable[str], now: datetime) -> "IslandQuerySet":
        """Active Islands whose unexpired API token hashes to one of `token_hashes`."""
        return self.active().filter(_holds_token(token_hashes, now))

    def placeable(self, spec: "JobSpec", now: datetime) -> "IslandQuerySet":
        """Active Islands that pass every rule of ELIGIBILITY for `spec` now, with their ask."""
        islands = self.active().annotate(**{ASK: ask_for(spec.workload)})
        for rule in ELIGIBILITY:
            islands = islands.filter(rule.passes(spec, now))
        return islands

    def exclusions(self, spec: "JobSpec", now: datetime) -> dict[str, int]:
        """How many active Islands each rule keeps from `spec`, each counted under the first it fails."""
        first_failed = Case(
            *(
                When(~condition, then=Value(rule.name))
                for rule in ELIGIBILITY
                if (condition := rule.passes(spec, now))
            ),
            default=Value(""),
        )
        counts = dict.fromkeys((rule.name for rule in ELIGIBILITY), 0)
        rows = (
            self.active()
            .annotate(**{ASK: ask_for(spec.workload)}, excluded_by=first_failed)
            .values("excluded_by")
            .annotate(islands=Count("pk"))
            .order_by()
        )
        for row in rows:
            if row["excluded_by"]:
                counts[row["excluded_by"]] = row["islands"]
        return counts


_IslandManagerBase = models.Manager.from_queryset(IslandQuerySet)


class IslandManager(_IslandManagerBase["Island"]):
    def linked_host(self, host_id: str) -> "Island | None":
        return self.active().select_related("owner").filter(host_id=host_id).first()

    def link(self, island: "Island", address: str | None = None) -> "Island":
        """Save a newly paired Island; or, if its owner removed an Island of the same host, bring that back.

        A host paired again to the same account is the same Island: it keeps
        its id, name, karma, job counters, earnings, history and any
        suspension, so removing an Island and pairing it again is not a reset
        of a bad score. It takes what the new pairing says (kind, transport,
        hardware, version, paired_at) as a new Island would, and comes back
        as it was removed: signed off, until its next heartbeat. Another
        account pairing the host starts a new Island (host ids are chosen by
        the Island software, so one account's record must not follow a host
        id into another's hands).

        Call it inside the pairing's transaction: two accounts racing for one
        host meet the unique constraint on active hosts whichever path they
        take (IntegrityError, as for an insert).
        """
        removed = (
            self.filter(owner_id=island.owner_id, host_id=island.host_id, removed_at__isnull=False)
            .order_by("-removed_at")
            .select_for_update(no_key=True)
            .first()
        )
        if removed is None:
            island.save(force_insert=True)
            signals.island_linked.send(sender=Island, island=island, address=address, now=island.paired_at)
            return island
        fields = [field.attname for field in Island._meta.concrete_fields if field.name not in KEPT_ON_RETURN]
        for name in fields:
            setattr(removed, name, getattr(island, name))
        removed.save(update_fields=fields)
        logger.info(
            "event=island_returned island_id=%s host_id=%s owner_id=%s karma=%s",
            removed.pk,
            removed.host_id,
            removed.owner_id,
            removed.karma,
        )
        signals.island_linked.send(sender=Island, island=removed, address=address, now=removed.paired_at)
        return removed

    def register_host(self, host_id: str, capabilities: Capabilities, version: str | None) -> bool:
        """Take the hardware and version a linked host registers with; False if none is linked.

        The agent's RegisterHost (NATS `coordinator.hosts.register`) comes at
        every start. Like a heartbeat's capabilities, what it leaves out or
        sends as null keeps its value. One UPDATE, so it needs no row lock of
        its own against a heartbeat batch writing the same row.
        """
        fields = capabilities.island_fields()
        if version:
            fields["agent_version"] = version
        linked = self.active().filter(host_id=host_id)
        return bool(linked.update(**fields)) if fields else linked.exists()

    def authenticate(self, token: str, now: datetime | None = None) -> "Island | None":
        """The active Island holding this API token, or None.

        Only the token's hash is stored, so a lookup hashes what was presented.
        Removed Islands have no token hash; expired tokens are refused here.
        """
        token_hash = hash_token(token)
        if token_hash is None:
            return None
        return self.holding_token(token_hash, now or timezone.now()).first()

    def record_heartbeats(self, beats: Sequence[Beat], now: datetime | None = None) -> list[HeartbeatOutcome]:
        """Apply a batch of heartbeats, from any transport, in one transaction.

        The one way a heartbeat reaches an Island: the HTTP API's group commit
        and the NATS bridge both call this, so the rules live here only. The
        answer has one outcome per beat, in order. Each beat names its Island
        by token hash or host id; the locking read that finds the Islands is
        also the token check, so a token revoked before it is refused even
        when other beats of the batch are written. A body naming another host
        than its Island's is refused. Of an Island's beats the latest wins, and
        a beat older than the one recorded is dropped, so batches may arrive
        out of order. However many beats there are, this costs one locking
        SELECT, one UPDATE and, only when some Island changed status, one
        INSERT.
        """
        if not beats:
            return []
        now = now or timezone.now()
        token_hashes = {beat.token_hash for beat in beats if beat.token_hash is not None}
        host_ids = {beat.host_id for beat in beats if beat.host_id is not None}
        with transaction.atomic():
            islands = self._lock_for_heartbeats(token_hashes, host_ids, now)
            by_token = {island.token_hash: island for island in islands if island.token_hash in token_hashes}
            by_host = {island.host_id: island for island in islands if island.host_id in host_ids}
            outcomes: list[HeartbeatOutcome] = []
            winners: dict[uuid.UUID, int] = {}
            for position, beat in enumerate(beats):
                island = by_token.get(beat.token_hash) if beat.token_hash is not None else None
                if island is None and beat.host_id is not None:
                    island = by_host.get(beat.host_id)
                heartbeat = beat.heartbeat
                if island is None:
                    outcomes.append(HeartbeatOutcome.UNAUTHORIZED)
                elif heartbeat is None:
                    outcomes.append(HeartbeatOutcome.UNREADABLE)
                elif heartbeat.host_id is not None and heartbeat.host_id != island.host_id:
                    outcomes.append(HeartbeatOutcome.WRONG_HOST)
                else:
                    outcomes.append(HeartbeatOutcome.ACCEPTED)
                    rival = winners.get(island.pk)
                    if rival is not None:
                        loser = rival if newest(beats[rival], beat) is beat else position
                        outcomes[loser] = HeartbeatOutcome.STALE
                        position = position if loser == rival else rival
                    winners[island.pk] = position
            written: list[Island] = []
            changes: list[StatusChange] = []
            threshold = offline_threshold()
            for island in islands:
                winner = winners.get(island.pk)
                if winner is None:
                    continue
                beat = beats[winner]
                assert beat.heartbeat is not None  # only readable beats can win
                if island.last_heartbeat_at is not None and beat.received_at < island.last_heartbeat_at:
                    outcomes[winner] = HeartbeatOutcome.STALE
                    continue
                changes += island._apply_heartbeat(beat.heartbeat, beat.received_at, threshold)
                written.append(island)
            self._write_heartbeat_fields(written)
            if changes:
                StatusChange.objects.bulk_create(changes)
                announce_fleet((change.island.owner_id, change.island_id) for change in changes)
        return outcomes

    def _lock_for_heartbeats(
        self, token_hashes: set[str], host_ids: set[str], now: datetime
    ) -> list["Island"]:
        """Lock and read the Islands a heartbeat batch names.

        The row locks make the status read here and the write that follows one
        compare-and-set with respect to the watcher, so a transition is recorded
        by exactly one of them. Locking in pk order keeps two concurrent batches
        from deadlocking; NO KEY leaves inserting jobs for these Islands unblocked.
        Only HEARTBEAT_READS is loaded: loading whole rows was most of a large
        batch's cost.
        """
        rows = self.heartbeat_lock(token_hashes, host_ids, now)
        return [Island.from_row(self.db, HEARTBEAT_READS, row) for row in rows]

    def heartbeat_lock(
        self, token_hashes: set[str], host_ids: set[str], now: datetime
    ) -> "models.QuerySet[Island, tuple[Any, ...]]":
        """The locking read of a heartbeat batch: HEARTBEAT_READS of each Island it names, as tuples.

        Separate so bench/nats_heartbeats.py can send the very same statement
        from psycopg alone.
        """
        conditions = []
        if token_hashes:
            conditions.append(_holds_token(token_hashes, now))
        if host_ids:
            conditions.append(Q(host_id__in=host_ids))
        islands = self.active().filter(functools.reduce(operator.or_, conditions))
        return islands.values_list(*HEARTBEAT_READS).select_for_update(no_key=True).order_by("pk")

    def _write_heartbeat_fields(self, islands: list["Island"]) -> None:
        """Save HEARTBEAT_FIELDS of many Islands; on PostgreSQL one UPDATE ... FROM unnest(...).

        bulk_update writes every column as a CASE with one branch per row,
        which PostgreSQL evaluates row by row (quadratic in the batch), and a
        batch of a few hundred heartbeats crosses jit_above_cost: LLVM then
        compiles those CASEs for many minutes, deaf to cancellation and to the
        barrier DROP DATABASE waits for. Here each column travels as one array
        parameter, bound server-side, so the statement is the same 17
        parameters whatever the batch size and costs an index lookup per row.
        The heartbeat columns are plain text, integers, aware datetimes and
        JSON (encoded here with msgspec, the slow part otherwise), which
        psycopg sends as they are. SQLite keeps bulk_update.
        """
        if len(islands) <= 1:
            # A plain UPDATE of one row is cheaper to plan than anything else.
            for island in islands:
                island.save(update_fields=HEARTBEAT_FIELDS)
            return
        connection = connections[self.db]
        if connection.vendor != "postgresql":
            self.bulk_update(islands, HEARTBEAT_FIELDS)
            return
        # A cursor of psycopg's own: Django's binds client-side, quoting every
        # array element in Python. Same connection, same transaction.
        with psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(self.heartbeat_update(), self.heartbeat_columns(islands))

    def _heartbeat_write_fields(self) -> list[models.Field[Any, Any]]:
        meta = self.model._meta
        fields: list[models.Field[Any, Any]] = []
        for name in ["id", *HEARTBEAT_FIELDS]:
            field = meta.get_field(name)
            assert isinstance(field, models.Field)
            fields.append(field)
        return fields

    def heartbeat_update(self) -> str:
        """PostgreSQL's UPDATE of a heartbeat batch, for heartbeat_columns() as its parameters.

        Public for the same reason as heartbeat_lock.
        """
        connection = connections[self.db]
        fields = self._heartbeat_write_fields()
        quote = connection.ops.quote_name
        # Identifiers and types come from the model, never from input; the
        # values travel as parameters, each an array of its column's type.
        names = [quote(field.column or field.attname) for field in fields]
        arrays = ", ".join(f"%b::{field.db_type(connection)}[]" for field in fields)
        assignments = ", ".join(f"{name} = v.{name}" for name in names[1:])
        return (
            f"UPDATE {quote(self.model._meta.db_table)} AS t SET {assignments} "  # noqa: S608
            f"FROM unnest({arrays}) AS v({', '.join(names)}) WHERE t.{names[0]} = v.{names[0]}"
        )

    def heartbeat_columns(self, islands: list["Island"]) -> list[list[Any]]:
        """heartbeat_update()'s parameters: one list per column, JSON encoded here."""
        columns: list[list[Any]] = []
        for column in self._heartbeat_write_fields():
            values = [getattr(island, column.attname) for island in islands]
            if isinstance(column, models.JSONField):
                values = [msgspec.json.encode(value).decode() for value in values]
            columns.append(values)
        return columns

    # --- Placement (ELIGIBILITY, the draw; docs/dispatch.md) -------------------------------

    def reserve(self, island: "Island", spec: "JobSpec", now: datetime) -> "Seat":
        """A slot on a named Island that may take `spec`; IslandIneligible with the first rule it fails."""
        fields = ("pk", "host_id", "transport", ASK)
        row = self.placeable(spec, now).filter(pk=island.pk).select_for_update(no_key=True).values(*fields)
        found = next(iter(row[:1]), None)
        taken = found is not None and self.filter(pk=island.pk, jobs_running__lt=F("capacity")).update(
            jobs_running=F("jobs_running") + 1
        )
        if not taken:
            counts = self.filter(pk=island.pk).exclusions(spec, now)
            first = next((rule for rule in ELIGIBILITY if counts[rule.name]), RULES["capacity"])
            raise IslandIneligible(first)
        assert found is not None
        return Seat(found["pk"], found["host_id"], found["transport"], found[ASK])

    def draw(self, spec: "JobSpec", now: datetime, rng: random.Random, exclude: Iterable[Any] = ()) -> "Draw":
        """Draw an eligible Island for `spec`, each with a chance in proportion to its weight; reserve a slot.

        The draw is a race of exponential clocks (docs/dispatch.md): each
        Island's next turn falls at `draw_next` in a shared virtual time, a
        turn coming at rate `draw_weight(karma, jobs_completed)`; the eligible Island
        whose turn falls first takes the job, and draws its next turn. The
        Islands in line are read in turn order from an index, so a draw costs
        a few rows, not the fleet. An Island whose turn fell behind the
        draw's clock (it was away, or could not take the jobs placed
        meanwhile) competes with a fresh turn, so it is neither owed jobs nor
        owes them. Each Island's chance is exactly its weight's share among
        those eligible.

        Nothing is locked while reading; the winner is taken with one
        conditional UPDATE on the very turn it was read with and on its
        capacity, which PostgreSQL re-checks on the row's latest version. So
        a placement locks one Island (and the clock, last): concurrent draws
        cannot deadlock, never overfill an Island, and one that loses the
        Island to another draws again.
        """

        def take(row: dict[str, Any], turn: float, following: float) -> "Seat | None":
            if not self._take_turn(row["pk"], row["draw_next"], turn, following):
                return None
            DrawClock.objects.filter(pk=1, time__lt=turn).update(time=turn)
            return Seat(row["pk"], row["host_id"], row["transport"], row[ASK])

        seat, stale = self.race(spec, now, rng, take, exclude)
        return Draw(seat, stale)

    def race[Won](
        self,
        spec: "JobSpec",
        now: datetime,
        rng: random.Random,
        take: Callable[[dict[str, Any], float, float], Won | None],
        exclude: Iterable[Any] = (),
    ) -> tuple[Won | None, int]:
        """draw()'s loop: the first turn among the eligible, given to `take(row, turn, following)`.

        `take` tries to take that turn, and returns what it won, or None when
        another placement holds the Island or took the turn first (the race
        then goes on without it). Returns what was won, or None, and how many
        turns behind the clock the walks met.
        """
        excluded = list(exclude)
        stale = 0
        for round_ in range(DRAW_ROUNDS):
            passed: list[Any] = []  # held by another placement this round
            for _ in range(DRAW_TRIES):
                first, clock = self._walk_start(spec, now, excluded + passed)
                read = functools.partial(self._read_walk, spec, now, excluded + passed, first)
                best = self._first_turn(read, clock, rng)
                stale += best.stale
                if best.row is None:
                    break
                row, turn = best.row, best.turn
                won = take(
                    row, turn, turn + rng.expovariate(1.0) / _weight(row["karma"], row["jobs_completed"])
                )
                if won is not None:
                    return won, stale
                # Another placement holds it, or took that turn first.
                passed.append(row["pk"])
            if not passed:
                return None, stale  # none eligible, contention or not
            # Everything eligible was being taken at this instant: a moment, then again.
            time.sleep(rng.uniform(0.001, 0.005) * (round_ + 1))
        return None, stale

    def _walk_start(
        self, spec: "JobSpec", now: datetime, passed: list[Any]
    ) -> tuple[list[dict[str, Any]], float]:
        """The first WALK_BATCH rows of the walk, and the draw's clock."""
        if connections[self.db].vendor == "postgresql":
            rows, clock = self.walk_first(spec, now, passed)
            if clock is not None or not rows:
                return rows, clock or 0.0
        return self._read_walk(spec, now, passed, None, 0), DrawClock.now()

    def _read_walk(
        self,
        spec: "JobSpec",
        now: datetime,
        passed: list[Any],
        first: list[dict[str, Any]] | None,
        offset: int,
    ) -> list[dict[str, Any]]:
        """WALK_BATCH rows of the walk (the eligible, in turn order) from `offset`; `first`: batch one."""
        if offset == 0 and first is not None:
            return first
        walk = self.placeable(spec, now).exclude(pk__in=passed).order_by("draw_next", "pk")
        return list(walk.values(*WALK_FIELDS)[offset : offset + WALK_BATCH])

    def _first_turn(
        self, fetch: Callable[[int], list[dict[str, Any]]], clock: float, rng: random.Random
    ) -> "Turn":
        """The row whose turn falls first, reading the walk (in turn order) only as far as needed.

        `fetch(offset)` reads WALK_BATCH rows of the walk from `offset`.
        Turns behind the clock come first in that order; each competes with a
        fresh turn drawn now, as if refresh_turns had drawn it.
        """
        best = Turn(None, 0.0, 0)
        offset = 0
        while True:
            rows = fetch(offset)
            for row in rows:
                recorded = row["draw_next"]
                if recorded >= clock:
                    # Every row after this one has a later turn.
                    if best.row is None or recorded < best.turn:
                        return Turn(row, recorded, best.stale)
                    return best
                turn = clock + rng.expovariate(1.0) / _weight(row["karma"], row["jobs_completed"])
                if best.row is None or turn < best.turn:
                    best = Turn(row, turn, best.stale + 1)
                else:
                    best = Turn(best.row, best.turn, best.stale + 1)
            if len(rows) < WALK_BATCH:
                return best
            offset += WALK_BATCH

    def walk_first(
        self, spec: "JobSpec", now: datetime, passed: list[Any]
    ) -> tuple[list[dict[str, Any]], float | None]:
        """The first WALK_BATCH eligible Islands in turn order, and the draw's clock (PostgreSQL).

        The same query as race()'s walk (placeable(), in turn order, without
        the Islands passed over), in one round trip with the clock, from SQL
        compiled once per job shape. The clock is None when its row is
        missing (after a flush).
        """
        sql, slots = self._walk_sql(spec)
        values: dict[str, Any] = {
            "workload": spec.workload,
            "budget": spec.budget,
            "vram": spec.min_vram_mb,
            "region": spec.region,
            "now": now,
            "passed": passed,
        }
        params = [literal if name is None else _like(literal, values[name]) for name, literal in slots]
        # Django's cursor binds client-side, so PostgreSQL plans the walk with
        # its values, and can see that the partial index (island_draw_idx) serves it.
        with connections[self.db].cursor() as cursor:
            cursor.execute(sql, params)
            names = [column[0] for column in cursor.description]
            found = cursor.fetchall()
        rows = [dict(zip(names, row, strict=True)) for row in found]
        clock = rows[0].pop("clock") if rows else None
        for row in rows[1:]:
            del row["clock"]
        return rows, clock

    def _walk_sql(self, spec: "JobSpec") -> tuple[str, list[tuple[str | None, Any]]]:
        shape = (
            spec.runtime,
            spec.min_vram_mb is None,
            spec.region is None,
            spec.platform,
            settings.DEFAULT_ASK,
        )
        compiled = _WALKS.get(shape)
        if compiled is not None:
            return compiled
        stand_in = replace(
            spec,
            workload=_STAND_INS["workload"],
            budget=_STAND_INS["budget"],
            min_vram_mb=None if spec.min_vram_mb is None else _STAND_INS["vram"],
            region=None if spec.region is None else _STAND_INS["region"],
        )
        not_passed = RawSQL(  # noqa: S611 (the table's name, and a parameter)
            f"NOT ({self.model._meta.db_table}.id = ANY(%s::uuid[]))",
            [_STAND_IN_PASSED],
            output_field=BooleanField(),
        )
        walk = (
            self.placeable(stand_in, _STAND_INS["now"])
            .filter(not_passed)
            .annotate(clock=Subquery(DrawClock.objects.filter(pk=1).values("time")[:1]))
            .order_by("draw_next", "pk")
            .values(*WALK_FIELDS, "clock")[:WALK_BATCH]
        )
        sql, params = walk.query.sql_with_params()
        slots: list[tuple[str | None, Any]] = []
        for param in params:
            if param is _STAND_IN_PASSED:
                slots.append(("passed", param))
                continue
            name = next(
                # isinstance: the ORM may wrap a value in a type of its driver's (psycopg's Int4).
                (
                    name
                    for name, value in _STAND_INS.items()
                    if isinstance(param, type(value)) and param == value
                ),
                None,
            )
            slots.append((name, param))
        compiled = _WALKS[shape] = (sql, slots)
        return compiled

    def _take_turn(self, pk: Any, recorded: float, turn: float, following: float) -> bool:
        """Take a slot on the Island and its turn, unless another placement got there first.

        Never waits: on PostgreSQL the row is locked with SKIP LOCKED, so an
        Island another transaction holds this instant (a placement, a
        heartbeat batch) is passed over, and its turn stays for the next
        draw. Waiting could deadlock: an UPDATE that waited for a row and found
        it changed still holds it (READ COMMITTED locks the newest version
        before re-checking). The condition (the turn it was read with, a free
        slot) is checked on the locked row itself.
        """
        connection = connections[self.db]
        if connection.vendor != "postgresql":
            # SQLite serialises writers: a plain compare-and-set decides.
            return bool(
                self.filter(pk=pk, draw_next=recorded, jobs_running__lt=F("capacity")).update(
                    jobs_running=F("jobs_running") + 1, draw_consumed=turn, draw_next=following
                )
            )
        with connection.cursor() as cursor:
            cursor.execute(self._take_turn_sql(), [turn, following, pk, recorded])
            return bool(cursor.rowcount == 1)

    def _take_turn_sql(self) -> str:
        """_take_turn's UPDATE on PostgreSQL (parameters: turn, following, pk, recorded), RETURNING the id."""
        table = connections[self.db].ops.quote_name(self.model._meta.db_table)
        return (
            f"UPDATE {table} SET jobs_running = jobs_running + 1, draw_consumed = %s, draw_next = %s "  # noqa: S608
            f"WHERE id = (SELECT id FROM {table} WHERE id = %s AND draw_next = %s "
            "AND jobs_running < capacity FOR NO KEY UPDATE SKIP LOCKED) RETURNING id"
        )

    def _refresh_turns(self, clock: float, rng: random.Random) -> int:
        """Give the Islands whose turn fell behind `clock` (or never came) a fresh one, oldest first."""
        behind = (
            self.filter(status=Island.Status.ONLINE, removed_at__isnull=True, suspended_at__isnull=True)
            .filter(draw_next__lt=clock)
            .order_by("draw_next")
            .select_for_update(no_key=True, skip_locked=True)
            .values_list("pk", "karma", "jobs_completed")[:REFRESH_BATCH]
        )
        turns = [(pk, clock + rng.expovariate(1.0) / _weight(karma, jobs)) for pk, karma, jobs in behind]
        if turns:
            self.filter(pk__in=[pk for pk, _ in turns]).update(
                draw_next=Case(
                    *(When(pk=pk, then=Value(turn)) for pk, turn in turns), output_field=FloatField()
                )
            )
        return len(turns)

    def refresh_turns(self, rng: random.Random | None = None) -> int:
        """The watcher's step: fresh turns for every Island behind the draw's clock, a batch at a time."""
        clock = DrawClock.now()
        refreshed = 0
        while True:
            with transaction.atomic():
                batch = self._refresh_turns(clock, rng or _DRAW)
            refreshed += batch
            if batch < REFRESH_BATCH:
                return refreshed

    def due_offline(self, now: datetime) -> IslandQuerySet:
        """Islands recorded online whose heartbeat deadline has passed, oldest deadline first."""
        return self.filter(status=Island.Status.ONLINE, offline_after__lte=now).order_by("offline_after")

    def record_silences(self, now: datetime, limit: int = WATCH_BATCH) -> list["StatusChange"]:
        """Record online→offline for Islands that went silent. The watcher's step.

        Each transition is a compare-and-set on the status and the very
        deadline that passed: of two watchers (or a watcher and a late
        heartbeat) only one changes the row, and only it records the change.
        The change is dated at the deadline, not when a watcher noticed.
        """
        changes: list[StatusChange] = []
        due = self.due_offline(now).values_list("pk", "offline_after", "owner_id")[:limit]
        for pk, deadline, owner_id in due:
            if deadline is None:  # never: due_offline compares it with now
                continue
            with transaction.atomic():
                won = self.filter(pk=pk, status=Island.Status.ONLINE, offline_after=deadline).update(
                    status=Island.Status.OFFLINE
                )
                if won:
                    announce_fleet([(owner_id, pk)])
                    change = StatusChange.objects.create(
                        island_id=pk,
                        at=deadline,
                        from_status=Island.Status.ONLINE,
                        to_status=Island.Status.OFFLINE,
                        reason=StatusChange.Reason.SILENCE,
                    )
                    # In this transaction: the offline alert's outbox row
                    # commits with the change or not at all (notify listens).
                    signals.island_silent.send(sender=StatusChange, change=change, now=now)
                    changes.append(change)
        return changes


class Island(models.Model):
    class Kind(models.TextChoices):
        DESKTOP = "desktop", "Desktop or server"
        MOBILE = "mobile", "Mobile"

    class Platform(models.TextChoices):
        IOS = "ios", "iOS"
        ANDROID = "android", "Android"

    class Transport(models.TextChoices):
        """How jobs reach it: published on its NATS subject, or handed out when it polls."""

        HTTP = "http", "HTTP API"
        NATS = "nats", "NATS"

    class Status(models.TextChoices):
        """The status last recorded, for the watcher's compare-and-set."""

        ONLINE = "online", "Online"
        OFFLINE = "offline", "Offline"
        SIGNED_OFF = "signed_off", "Signed off"

    class LiveStatus(models.TextChoices):
        """What people are shown: derived from the clock when read, never stale."""

        ONLINE = "online", "Online"
        # Silent past its deadline without signing off: a crash, a lost
        # network. Karma charges it once the silence outlasts the grace.
        OFFLINE = "offline", "Down"
        SIGNED_OFF = "signed_off", "Signed off"
        # Linked, and no heartbeat yet: nothing is wrong with it.
        NEW = "new", "Waiting for its first heartbeat"
        SUSPENDED = "suspended", "Suspended"
        REMOVED = "removed", "Removed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="islands")
    host_id = models.CharField(max_length=64)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.DESKTOP)
    name = models.CharField(max_length=100)

    # Hardware, as the Island reported it when pairing, updated by heartbeats
    # that report it (see Island._take_hardware).
    gpu_model = models.CharField(max_length=128, blank=True)
    gpu_vram_mb = models.PositiveIntegerField(null=True, blank=True)
    cpu_cores = models.PositiveIntegerField(null=True, blank=True)
    ram_mb = models.PositiveIntegerField(null=True, blank=True)
    region = models.CharField(max_length=64, blank=True)
    agent_version = models.CharField(max_length=64, blank=True)

    # Phones only.
    platform = models.CharField(max_length=16, choices=Platform.choices, blank=True)
    device_model = models.CharField(max_length=128, blank=True)
    os_version = models.CharField(max_length=64, blank=True)
    runtime = models.CharField(max_length=32, blank=True)
    accelerator = models.CharField(max_length=32, blank=True)

    # The API token is stored only as a SHA-256 hash; the plaintext is shown
    # to the Island once, when it is issued.
    token_hash = models.CharField(max_length=64, null=True, blank=True, unique=True)
    token_expires_at = models.DateTimeField(null=True, blank=True)

    paired_at = models.DateTimeField(default=timezone.now)
    # Removing keeps the row, so the job ledger and karma history stay whole;
    # a removed Island has no token and its host may pair again.
    removed_at = models.DateTimeField(null=True, blank=True)
    # An admin may suspend an Island: it keeps its token and keeps reporting,
    # but is shown as suspended and gets no new jobs.
    suspended_at = models.DateTimeField(null=True, blank=True)
    # The end of the maintenance window going on, if any (MaintenanceWindow
    # keeps them all): until then no silence charges, no offline alerts and
    # no new jobs. Read against the clock, like offline_after: a past value
    # means none.
    maintenance_until = models.DateTimeField(null=True, blank=True, editable=False)

    # Online status, healthchecks-style. Every heartbeat moves `offline_after`
    # to its receive time plus the threshold; the status people see is
    # derived from that deadline and the clock (see status_at). `status` is
    # the last *recorded* status, which the watcher and heartbeats change
    # with a compare-and-set so each transition is recorded exactly once.
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OFFLINE)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    offline_after = models.DateTimeField(null=True, blank=True)

    # The latest heartbeat's picture, replaced by each heartbeat. The sizes
    # are bounded by the heartbeat struct's limits and its body limit.
    metrics = models.JSONField(default=dict, blank=True)
    supported_runtimes = models.JSONField(default=list, blank=True)
    asking_prices = models.JSONField(default=dict, blank=True)

    # What placement reads (ELIGIBILITY), kept from heartbeats and pairing.
    # How it paired, so how jobs reach it: over NATS for the agent, by its
    # polls for the simulator and phones.
    transport = models.CharField(max_length=8, choices=Transport.choices, default=Transport.HTTP)
    # The runtimes it can run, each between spaces (" container wasm "), so
    # that "runs onnx" is one `LIKE '% onnx %'` on every database. Derived
    # from supported_runtimes (desktops) or runtime (phones) in save() and
    # by heartbeats; see runtimes_text().
    runtimes = models.CharField(max_length=1100, default=" container wasm ", editable=False)
    # How many jobs it runs at once (the agent's max_concurrent_containers).
    capacity = models.PositiveIntegerField(default=1)
    # False while a phone's latest heartbeat says its battery or heat forbid work.
    may_work = models.BooleanField(default=True)
    # The draw's clocks, in its virtual time (docs/dispatch.md): when this
    # Island's next turn falls, and the turn it last took.
    # A new Island's turn is behind any clock (the clock starts at 0): it draws one first.
    draw_next = models.FloatField(default=-1.0, editable=False)
    draw_consumed = models.FloatField(null=True, blank=True, editable=False)

    # Derived from the job ledger (Job), changed in the same transaction as
    # the job whose terminal state they count.
    jobs_completed = models.PositiveIntegerField(default=0)
    jobs_failed = models.PositiveIntegerField(default=0)
    earnings = models.DecimalField(max_digits=18, decimal_places=4, default=Decimal(0))
    # The running sum of the Island's karma events (karma.KarmaEvent), kept on
    # the row so the cards read it without a join. Only KarmaEvent.objects
    # changes it, in the same transaction as the event it adds.
    karma = models.DecimalField(max_digits=5, decimal_places=2, default=karma_rules.START, editable=False)
    # Jobs placed on it that have not ended, changed with them (JobManager):
    # placement counts it against `capacity` before deciding.
    jobs_running = models.PositiveIntegerField(default=0, editable=False)

    # The ledger columns as loaded (see save()); not a field.
    _ledger_loaded: dict[str, Any]

    objects = IslandManager()

    class Meta:
        ordering = ["paired_at"]
        constraints = [
            # One active Island per host: the database settles two accounts
            # racing to link the same host.
            models.UniqueConstraint(
                fields=["host_id"],
                condition=Q(removed_at__isnull=True),
                name="island_unique_active_host",
            ),
            models.CheckConstraint(
                condition=Q(karma__gte=karma_rules.MINIMUM, karma__lte=karma_rules.MAXIMUM),
                name="island_karma_in_range",
            ),
        ]
        indexes = [
            # Serves "Your Islands": the active Islands of one owner.
            models.Index(fields=["owner", "removed_at"], name="island_owner_idx"),
            # Serves the watcher (due_offline): Islands recorded online whose
            # deadline passed. Partial, so offline Islands cost it nothing.
            models.Index(
                fields=["offline_after"],
                condition=Q(status="online"),
                name="island_due_offline_idx",
            ),
            # Serves the draw (Island.objects.draw): the Islands recorded
            # online and placeable, in the order their turns fall. Partial, so
            # the offline fleet costs the walk nothing.
            models.Index(
                fields=["draw_next", "id"],
                condition=Q(status="online", removed_at__isnull=True, suspended_at__isnull=True),
                name="island_draw_idx",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Save, refusing loudly any write of a ledger column (LEDGER_FIELDS).

        Jobs completed and failed, earnings and karma change only by the
        UPDATE of their own ledgers, in the transaction that records why
        (Job.objects, KarmaEvent.objects), so `island.karma = 10;
        island.save()` raises LedgerFieldWrite instead of writing a score no
        event explains. A full save of an existing Island (a rename, the
        admin's form) leaves those columns out, so it cannot write back stale
        values over the ledgers' concurrent changes either. A new Island may
        be created with any values.
        """
        if not self.name:
            self.name = self.default_name()
        update_fields = kwargs.get("update_fields")
        if (
            not RUNTIME_SOURCES & self.get_deferred_fields()
            and (runtimes := self.runtimes_text()) != self.runtimes
        ):
            self.runtimes = runtimes
            if update_fields is not None:
                kwargs["update_fields"] = update_fields = [*update_fields, "runtimes"]
        if not self._state.adding and not kwargs.get("force_insert"):
            if update_fields is None:
                loaded = getattr(self, "_ledger_loaded", {})
                changed = sorted(
                    name for name, value in loaded.items() if self.__dict__.get(name, value) != value
                )
                if changed:
                    raise LedgerFieldWrite(
                        f"{', '.join(changed)} of an Island change only through their ledgers "
                        "(Job.objects, KarmaEvent.objects), never through save()"
                    )
                kwargs["update_fields"] = [
                    field.name
                    for field in self._meta.concrete_fields
                    if not field.primary_key and field.name not in LEDGER_FIELDS
                ]
            elif written := sorted(LEDGER_FIELDS.intersection(update_fields)):
                raise LedgerFieldWrite(
                    f"{', '.join(written)} of an Island change only through their ledgers, "
                    "never through save(update_fields=...)"
                )
        adding = self._state.adding
        super().save(*args, **kwargs)
        if adding:
            self._remember_ledger()

    @classmethod
    def from_db(
        cls, db: str | None, field_names: Collection[str], values: Collection[Any], **kwargs: Any
    ) -> "Island":
        island = super().from_db(db, field_names, values, **kwargs)
        # What the ledger columns held when loaded, so save() can tell a
        # change to them (refused) from a row that merely carries them.
        island._remember_ledger()
        return island

    @classmethod
    def from_row(cls, db: str, attnames: Sequence[str], row: Sequence[Any]) -> "Island":
        """The Island a row of values_list(*attnames) describes, as from_db would build it.

        Model.__init__ walks every field of the model, per Island, to fill in
        the deferred ones; a heartbeat batch locks thousands of Islands, and
        this does only the assignments (how much it saves is not yet measured:
        docs/performance.md, the bridge). The values here are already the
        fields' Python values (values_list applies the converters); what is not
        among attnames stays deferred, loaded on first access as with only().
        Nothing listens to Island's pre_init or post_init, which this skips.
        """
        island = cls.__new__(cls)
        island.__dict__.update(zip(attnames, row, strict=True))
        state = ModelState()
        state.db = db
        state.adding = False
        island._state = state
        island._remember_ledger()
        return island

    def refresh_from_db(self, *args: Any, **kwargs: Any) -> None:
        super().refresh_from_db(*args, **kwargs)
        fields = kwargs.get("fields")
        self._remember_ledger(None if fields is None else set(fields))

    def _remember_ledger(self, only: set[str] | None = None) -> None:
        remembered = getattr(self, "_ledger_loaded", {})
        for name in LEDGER_FIELDS:
            if name in self.__dict__ and (only is None or name in only):
                remembered[name] = self.__dict__[name]
        self._ledger_loaded = remembered

    def runtimes_text(self) -> str:
        """What `runtimes` holds: the runtimes it reported (desktops) or paired with (phones)."""
        if self.kind == self.Kind.MOBILE:
            names = [self.runtime]
        else:
            names = list(self.supported_runtimes or DESKTOP_RUNTIMES)
        kept = sorted({name.lower() for name in names if name and RUNTIME_NAME.fullmatch(name.lower())})
        return f" {' '.join(kept)} " if kept else " "

    def default_name(self) -> str:
        label = self.device_model or self.gpu_model or "Island"
        return f"{label} ({self.host_id[:8]})"

    def issue_token(self, now: datetime | None = None) -> str:
        """Set a new API token, replacing any earlier one, and return it once."""
        now = now or timezone.now()
        token = TOKEN_PREFIX + generate_secret()
        self.token_hash = hash_secret(token)
        self.token_expires_at = now + MOBILE_TOKEN_TTL if self.kind == self.Kind.MOBILE else None
        self.save(update_fields=["token_hash", "token_expires_at"])
        return token

    def remove(self, now: datetime | None = None) -> None:
        """Unlink the Island: its token stops working at once, and it is recorded as signed off.

        Removing is deliberate, like a sign-off, and recorded as one (reason
        `removed`): it ends a disconnection going on, so karma charges
        nothing after it, and an Island its owner pairs again
        (IslandManager.link) comes back signed off until its next heartbeat.
        A silence the watcher has not recorded yet is recorded first, at its
        deadline, as a heartbeat would.
        """
        now = now or timezone.now()
        with transaction.atomic():
            row = (
                Island.objects.select_for_update(no_key=True)
                .filter(pk=self.pk, removed_at__isnull=True)
                .values("status", "offline_after")
                .first()
            )
            if row is None:
                return  # already removed
            current, deadline = row["status"], row["offline_after"]
            changes: list[StatusChange] = []
            if current == self.Status.ONLINE and deadline is not None and deadline <= now:
                changes.append(
                    self._change(current, self.Status.OFFLINE, StatusChange.Reason.SILENCE, deadline)
                )
                current = self.Status.OFFLINE
            if current != self.Status.SIGNED_OFF:
                changes.append(
                    self._change(current, self.Status.SIGNED_OFF, StatusChange.Reason.REMOVED, now)
                )
            StatusChange.objects.bulk_create(changes)
            self.removed_at = now
            self.status = self.Status.SIGNED_OFF
            self.token_hash = None
            self.token_expires_at = None
            self.save(update_fields=["removed_at", "status", "token_hash", "token_expires_at"])
        logger.info(
            "event=island_removed island_id=%s host_id=%s owner_id=%s", self.pk, self.host_id, self.owner_id
        )

    def in_maintenance(self, now: datetime) -> bool:
        return self.maintenance_until is not None and self.maintenance_until > now

    def status_at(self, now: datetime) -> "Island.LiveStatus":
        """What this Island is shown as at `now`.

        Online means a heartbeat beat the deadline and no sign-off followed,
        whether or not the watcher has run since.
        """
        if self.removed_at is not None:
            return self.LiveStatus.REMOVED
        if self.suspended_at is not None:
            return self.LiveStatus.SUSPENDED
        if self.status == self.Status.SIGNED_OFF:
            return self.LiveStatus.SIGNED_OFF
        if self.last_heartbeat_at is None:
            return self.LiveStatus.NEW
        if self.offline_after is not None and now < self.offline_after:
            return self.LiveStatus.ONLINE
        return self.LiveStatus.OFFLINE

    @property
    def karma_charged_from(self) -> datetime | None:
        """When a silence without sign-off starts costing karma, if it lasts.

        The silence is dated at the deadline that passed (`offline_after`),
        and the first disconnection charge falls one grace period later
        (karma.rules.DISCONNECTION_GRACE); None for an Island never heard from.
        """
        if self.offline_after is None or self.last_heartbeat_at is None:
            return None
        return self.offline_after + karma_rules.DISCONNECTION_GRACE

    def live_key(self, now: datetime) -> str:
        """What "Your Islands" shows of this Island that changes without a reload: status and counters.

        The list renders it (`data-live`) and the live socket's snapshot
        sends it, so the page can tell whether what it shows is current.
        """
        maintenance = (
            self.maintenance_until.isoformat() if self.in_maintenance(now) and self.maintenance_until else ""
        )
        counters = f"{self.jobs_completed}|{self.jobs_failed}|{self.earnings}|{self.karma}"
        return f"{self.status_at(now)}|{counters}|{maintenance}"

    def shown_until(self, now: datetime) -> datetime | None:
        """When what this Island's card says changes by the clock alone, with no event: None if never.

        Online turns Down at its deadline; Down turns from "costs karma from"
        to "costing karma since" when the grace ends; maintenance ends. The page reloads its
        list then, so neither waits for the watcher or a poll.
        """
        status = self.status_at(now)
        changes: list[datetime] = []
        if status == self.LiveStatus.ONLINE and self.offline_after is not None:
            changes.append(self.offline_after)
        charge = self.karma_charged_from
        if status == self.LiveStatus.OFFLINE and charge is not None and charge > now:
            changes.append(charge)
        if self.in_maintenance(now) and self.maintenance_until is not None:
            # The maintenance line goes at the window's end.
            changes.append(self.maintenance_until)
        return min(changes, default=None)

    def _apply_heartbeat(
        self, heartbeat: EnhancedHeartbeat, received_at: datetime, threshold: timedelta
    ) -> list["StatusChange"]:
        """Take in one heartbeat, in memory; return the status changes it makes (unsaved).

        Only `Island.objects.record_heartbeats` calls this: it locks the row
        and saves. A heartbeat arriving after the deadline passed also records
        the silence the watcher has not recorded yet, dated at the deadline,
        so the history is exact whenever the watcher happens to run.
        """
        target = self.Status.SIGNED_OFF if heartbeat.signs_off else self.Status.ONLINE
        changes: list[StatusChange] = []
        current = self.status
        if (
            current == self.Status.ONLINE
            and self.offline_after is not None
            and self.offline_after <= received_at
        ):
            changes.append(
                self._change(current, self.Status.OFFLINE, StatusChange.Reason.SILENCE, self.offline_after)
            )
            current = self.Status.OFFLINE
        if current != target:
            if heartbeat.signs_off:
                reason = StatusChange.Reason.GRACEFUL
            elif self.last_heartbeat_at is None:
                reason = StatusChange.Reason.FIRST_HEARTBEAT
            else:
                reason = StatusChange.Reason.BACK_ONLINE
            changes.append(self._change(current, target, reason, received_at))

        self.status = target
        self.last_heartbeat_at = received_at
        self.offline_after = received_at if heartbeat.signs_off else received_at + threshold
        self.metrics = heartbeat.metrics()
        estimates = heartbeat.performance_estimates
        self.supported_runtimes = list(estimates.supported_runtimes or []) if estimates else []
        # The agent sends prices only while pricing is configured; none means none.
        self.asking_prices = dict(heartbeat.asking_prices or {})
        if heartbeat.agent_version:
            self.agent_version = heartbeat.agent_version
        self._take_hardware(heartbeat)
        self.runtimes = self.runtimes_text()
        concurrent = estimates.max_concurrent_containers if estimates else None
        self.capacity = max(1, concurrent or 1)
        self.may_work = heartbeat.may_work
        return changes

    def _take_hardware(self, heartbeat: EnhancedHeartbeat) -> None:
        """Hardware a heartbeat reveals; what it leaves out stays as paired."""
        if heartbeat.system is not None and heartbeat.system.memory_total_mb is not None:
            self.ram_mb = heartbeat.system.memory_total_mb
        if heartbeat.gpus:
            first = min(heartbeat.gpus, key=lambda gpu: gpu.index or 0)
            if first.memory_total_mb is not None:
                self.gpu_vram_mb = first.memory_total_mb
        if heartbeat.capabilities is not None:
            self.take_capabilities(heartbeat.capabilities)

    def take_capabilities(self, capabilities: Capabilities) -> None:
        """Take the hardware an Island reports, in memory; what it leaves out keeps its value."""
        for name, value in capabilities.island_fields().items():
            setattr(self, name, value)

    def _change(self, from_status: str, to_status: str, reason: str, at: datetime) -> "StatusChange":
        return StatusChange(island=self, at=at, from_status=from_status, to_status=to_status, reason=reason)

    @property
    def hardware_summary(self) -> str:
        parts: list[str] = []
        if self.kind == self.Kind.MOBILE:
            if self.device_model:
                parts.append(self.device_model)
            if self.runtime:
                parts.append(f"{self.runtime} / {self.accelerator}" if self.accelerator else self.runtime)
        elif self.gpu_model:
            vram = f" {gigabytes(self.gpu_vram_mb)}" if self.gpu_vram_mb else ""
            parts.append(f"{self.gpu_model}{vram}")
        if self.cpu_cores:
            parts.append(f"{self.cpu_cores} CPU cores")
        if self.ram_mb:
            parts.append(f"{gigabytes(self.ram_mb)} RAM")
        return " · ".join(parts) or "Not reported yet"


# A maintenance window lasts at most this long, and an Island may spend at
# most MAINTENANCE_BUDGET in maintenance over any MAINTENANCE_PERIOD: enough
# for an upgrade or a move, too little to hide a flaky machine.
MAINTENANCE_MAX = timedelta(hours=24)
MAINTENANCE_BUDGET = timedelta(hours=24)
MAINTENANCE_PERIOD = timedelta(days=7)


class MaintenanceRefused(Exception):
    """A window the limits do not allow; the message is safe to show."""


class MaintenanceWindowManager(models.Manager["MaintenanceWindow"]):
    def used(self, island: Island, now: datetime) -> timedelta:
        """Time spent in maintenance within the last MAINTENANCE_PERIOD, the current window included."""
        since = now - MAINTENANCE_PERIOD
        used = timedelta(0)
        for starts, ends in self.filter(island=island, ends_at__gt=since, starts_at__lt=now).values_list(
            "starts_at", "ends_at"
        ):
            used += min(ends, now) - max(starts, since)
        return used

    def covering(self, island_id: Any) -> list[tuple[datetime, datetime]]:
        """An Island's windows as (start, end) pairs, for the karma rules."""
        return list(self.filter(island_id=island_id).values_list("starts_at", "ends_at"))

    def announce(self, island: Island, until: datetime | None, by: str, now: datetime) -> datetime | None:
        """Start, extend or (until=None) end the Island's maintenance; returns when it now ends.

        A window starts now: it may start during a silence already under way,
        and stops further charges from its start. At most MAINTENANCE_MAX
        ahead, and MAINTENANCE_BUDGET per MAINTENANCE_PERIOD counting the
        windows before (an extension counts as one window). The Island's row
        is locked, so two announcements apply one after the other.
        """
        with transaction.atomic():
            locked = Island.objects.select_for_update(no_key=True).get(pk=island.pk)
            current = (
                self.filter(island=locked, starts_at__lte=now, ends_at__gt=now).order_by("-ends_at").first()
            )
            if until is None:
                if current is not None:
                    self.filter(pk=current.pk).update(ends_at=now)
                Island.objects.filter(pk=locked.pk).update(maintenance_until=None)
                island.maintenance_until = None
                announce_fleet([(locked.owner_id, locked.pk)])
                return None
            if until <= now:
                raise MaintenanceRefused("“until” must be in the future.")
            if until - now > MAINTENANCE_MAX:
                raise MaintenanceRefused("A maintenance window lasts at most 24 hours from now.")
            earlier = self.used(locked, now)
            if earlier + (until - now) > MAINTENANCE_BUDGET:
                left = max(MAINTENANCE_BUDGET - earlier, timedelta(0))
                hours, rest = divmod(int(left.total_seconds()) // 60, 60)
                raise MaintenanceRefused(
                    "An Island may be in maintenance 24 hours per 7 days; "
                    f"{hours} h {rest} min are left for this one."
                )
            if current is not None:
                self.filter(pk=current.pk).update(ends_at=until)
            else:
                self.create(island=locked, starts_at=now, ends_at=until, announced_by=by, created_at=now)
            Island.objects.filter(pk=locked.pk).update(maintenance_until=until)
            island.maintenance_until = until
            announce_fleet([(locked.owner_id, locked.pk)])
            return until


class MaintenanceWindow(models.Model):
    """A time an Island's owner (or the Island) announced it would be away on purpose."""

    class By(models.TextChoices):
        OWNER = "owner", "Its owner"
        ISLAND = "island", "The Island"

    island = models.ForeignKey(Island, on_delete=models.CASCADE, related_name="maintenance_windows")
    starts_at = models.DateTimeField()
    # Moved to the moment it was ended early, or later by an extension.
    ends_at = models.DateTimeField()
    announced_by = models.CharField(max_length=8, choices=By.choices)
    created_at = models.DateTimeField()

    objects = MaintenanceWindowManager()

    class Meta:
        indexes = [
            # Serves the budget (an Island's windows of the last 7 days) and the karma rules.
            models.Index(fields=["island", "ends_at"], name="maintenance_island_idx"),
        ]

    def __str__(self) -> str:
        return f"Maintenance of {self.island_id} {self.starts_at:%Y-%m-%d %H:%M}–{self.ends_at:%H:%M}"


class StatusChange(models.Model):
    """One recorded transition of an Island's status, dated when it happened.

    Silences are recorded by the watcher (or by the next heartbeat, whichever
    comes first) at the deadline that passed; sign-offs and returns at the
    heartbeat's receive time. The karma rules read these rows: a `silence`
    opens an incident that the Island's next change closes (`back_online`,
    or a `graceful` sign-off sent on its way back). Every row's from_status
    is the previous row's to_status.
    """

    class Reason(models.TextChoices):
        SILENCE = "silence", "No heartbeat before the deadline"
        GRACEFUL = "graceful", "Signed off"
        BACK_ONLINE = "back_online", "Back online"
        FIRST_HEARTBEAT = "first_heartbeat", "First heartbeat"
        REMOVED = "removed", "Removed by its owner or an administrator"

    island = models.ForeignKey(Island, on_delete=models.CASCADE, related_name="status_changes")
    at = models.DateTimeField()
    from_status = models.CharField(max_length=16, choices=Island.Status.choices)
    to_status = models.CharField(max_length=16, choices=Island.Status.choices)
    reason = models.CharField(max_length=16, choices=Reason.choices)
    # Karma's bookkeeping, on silences only: set once the incident this row
    # opens owes no more disconnection charges (it ended, or reached the cap),
    # so the watcher stops looking at it. See KarmaEvent.objects.charge_disconnections.
    karma_settled_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        indexes = [
            # Serves "an Island's changes in time order" (the karma rules,
            # the admin): an index range scan in `at` order per Island.
            models.Index(fields=["island", "at"], name="statuschange_island_at_idx"),
            # Serves the watcher's karma step: the disconnections that may still
            # owe a charge. Partial, so the settled history costs it nothing.
            models.Index(
                fields=["at"],
                condition=Q(reason="silence", karma_settled_at__isnull=True),
                name="statuschange_unsettled_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.from_status} → {self.to_status} ({self.reason}) at {self.at:%Y-%m-%d %H:%M:%S}"


class JobError(Exception):
    """A job operation that cannot go ahead; the message is safe to show."""


class JobNotFound(JobError):
    """No such job for this Island: unknown, or another Island's (one answer for both)."""


class JobMoved(JobError):
    """The job was this Island's once, and has moved on: re-placed after a timeout, or ended."""

    def __init__(self, job_id: str):
        super().__init__(f"job {job_id} is no longer this Island's: it was given to another or ended")


class JobStateConflict(JobError):
    def __init__(self, job_id: str, state: str):
        super().__init__(f"job {job_id} already ended as {state}")
        self.state = state


class DuplicateJob(JobError):
    def __init__(self, existing: "Job"):
        super().__init__(f"job_id {existing.job_id} is already recorded")
        self.existing = existing


class IslandIneligible(JobError):
    """The Island named for a job may not take it; `rule` is the first rule it fails."""

    def __init__(self, rule: "Rule"):
        super().__init__(f"this Island cannot take the job: {rule.refusal}")
        self.rule = rule


class NoEligibleIsland(JobError):
    """No Island may take the job now; `reasons` counts the Islands each rule excluded."""

    def __init__(self, reasons: dict[str, int]):
        super().__init__("no eligible island")
        self.reasons = reasons


@dataclass(frozen=True)
class StatusReport:
    """The outcome of an Island's status report: applied, or accepted and ignored."""

    applied: bool
    state: "Job.State"


# --- Placement: which Islands may take a job, and the draw among them -------------


@dataclass(frozen=True)
class JobSpec:
    """A job as a dispatcher describes it, before it has an Island."""

    job_id: str
    workload: str
    lease: timedelta
    budget: Decimal
    runtime: str = "container"
    input: Any = None
    min_vram_mb: int | None = None
    region: str | None = None
    platform: str | None = None
    artefacts: dict[str, Any] = field(default_factory=dict)
    # A fixed amount (the explicit form's `credits`); otherwise the job pays
    # the chosen Island's ask.
    credits: Decimal | None = None

    @classmethod
    def of(cls, job: "Job") -> "JobSpec":
        """The spec a recorded job was submitted with, for placing it again."""
        requirements = job.requirements or {}
        return cls(
            job_id=job.job_id,
            workload=job.workload,
            lease=timedelta(seconds=job.lease_seconds),
            budget=job.budget,
            runtime=job.runtime,
            input=job.input,
            min_vram_mb=requirements.get("min_vram_mb"),
            region=requirements.get("region"),
            platform=requirements.get("platform"),
            artefacts=job.artefacts,
            credits=job.credits if job.fixed_credits else None,
        )

    def requirements(self) -> dict[str, Any]:
        asked = {"min_vram_mb": self.min_vram_mb, "region": self.region, "platform": self.platform}
        return {name: value for name, value in asked.items() if value is not None}


# What an Island asks for a workload, in SQL: its price for that workload,
# else its `_default`, else the service's DEFAULT_ASK. Prices are decimal
# strings (the heartbeat's Price pattern), so the cast cannot fail.
ASK = "placement_ask"
_PRICE = DecimalField(max_digits=21, decimal_places=8)


def ask_for(workload: str) -> Coalesce:
    return Coalesce(
        Cast(KeyTextTransform(workload, "asking_prices"), _PRICE),
        Cast(KeyTextTransform("_default", "asking_prices"), _PRICE),
        Value(settings.DEFAULT_ASK, output_field=_PRICE),
        output_field=_PRICE,
    )


@dataclass(frozen=True)
class Rule:
    """One rule an Island must pass to take a job; the rules are ELIGIBILITY, in order.

    `name` keys the count of Islands it excluded (the 503's `reasons`);
    `refusal` is why a named Island may not take a job (the 409); `passes`
    is the condition, in SQL, for an Island that passes.
    """

    name: str
    refusal: str
    passes: Callable[[JobSpec, datetime], Q]


def _subject_safe() -> Q:
    # A host id is one token of the agent's subjects (host.{id}.jobs): a
    # dot would split it, and * > or a space would make it a wildcard.
    unsafe = Q(host_id__contains=".") | Q(host_id__contains="*") | Q(host_id__contains=">")
    return Q(transport=Island.Transport.HTTP) | ~(unsafe | Q(host_id__contains=" "))


def _platform(spec: JobSpec) -> Q:
    if spec.platform is None:
        return Q()
    if spec.platform == "desktop":
        return Q(kind=Island.Kind.DESKTOP)
    return Q(kind=Island.Kind.MOBILE, platform=spec.platform)


def _region(spec: JobSpec) -> Q:
    if spec.region is None:
        return Q()
    # "auto" (the agent's default) and no region never match a region asked for.
    return Q(region__iexact=spec.region) & ~Q(region__iexact="auto") & ~Q(region="")


ELIGIBILITY: tuple[Rule, ...] = (
    Rule("suspended", "it is suspended", lambda spec, now: Q(suspended_at__isnull=True)),
    Rule(
        "maintenance",
        "its owner announced maintenance",
        lambda spec, now: Q(maintenance_until__isnull=True) | Q(maintenance_until__lte=now),
    ),
    Rule(
        "offline",
        "it is offline",
        lambda spec, now: Q(status=Island.Status.ONLINE, offline_after__gt=now),
    ),
    Rule(
        "runtime",
        "it does not run this job's runtime",
        lambda spec, now: Q(runtimes__contains=f" {spec.runtime} "),
    ),
    Rule(
        "resting",
        "it is a phone whose battery or temperature does not allow work now",
        lambda spec, now: Q(may_work=True),
    ),
    Rule(
        "vram",
        "it has less GPU memory than the job needs",
        lambda spec, now: Q() if spec.min_vram_mb is None else Q(gpu_vram_mb__gte=spec.min_vram_mb),
    ),
    Rule("region", "it is not in the region the job asks for", lambda spec, now: _region(spec)),
    Rule("platform", "it is not the platform the job asks for", lambda spec, now: _platform(spec)),
    Rule(
        "subject",
        "its host id cannot name a NATS subject, so jobs cannot reach it",
        lambda spec, now: _subject_safe(),
    ),
    Rule(
        "price",
        "it asks more for this workload than the job's budget",
        lambda spec, now: Q(**{f"{ASK}__lte": spec.budget}),
    ),
    Rule(
        "karma",
        "its karma is below the placement floor",
        lambda spec, now: Q(karma__gte=karma_rules.PLACEMENT_FLOOR),
    ),
    Rule(
        "capacity",
        "it is running as many jobs as it can",
        lambda spec, now: Q(jobs_running__lt=F("capacity")),
    ),
)


RULES = {rule.name: rule for rule in ELIGIBILITY}


def _weight(karma: Decimal, jobs_completed: int) -> float:
    """An Island's weight in the draw (probation included); the floor's stands in below it (never drawn then).

    Both ways of placing (the ORM's walk, and PostgreSQL's compiled walk and
    one-statement placement) and the refresh of turns left behind read the
    same WALK_FIELDS and draw every turn with this, so they cannot disagree.
    """
    return karma_rules.draw_weight(max(karma, karma_rules.PLACEMENT_FLOOR), jobs_completed)


@dataclass(frozen=True)
class Draw:
    """What a draw found: a seat, or none; and how many turns it found behind the clock."""

    seat: "Seat | None"
    stale: int


@dataclass(frozen=True)
class Turn:
    """The first turn a walk found: its row (or none), when it falls, and the stale turns passed."""

    row: dict[str, Any] | None
    turn: float
    stale: int


@dataclass(frozen=True)
class Seat:
    """A slot reserved on an Island for one job, and what the job pays it."""

    island_id: uuid.UUID
    host_id: str
    transport: str
    ask: Decimal


class DrawClock(models.Model):
    """The draw's virtual time: the latest turn any Island has taken. One row (docs/dispatch.md)."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    time = models.FloatField(default=0.0)

    def __str__(self) -> str:
        return f"{self.time:.9f}"

    @classmethod
    def now(cls) -> float:
        """The draw's time now (the row is made on first use; a migration makes it too)."""
        time = cls.objects.filter(pk=1).values_list("time", flat=True).first()
        if time is None:
            time = cls.objects.get_or_create(pk=1)[0].time
        return time

    @classmethod
    def ensure(cls) -> None:
        """Make the row outside any placement's transaction (after a flush, say): two
        placements making it at once would wait for each other's insert while
        holding Islands, and deadlock."""
        if not cls.objects.filter(pk=1).exists():
            cls.objects.get_or_create(pk=1)


# Placement is a fair draw, not a secret: a seeded PRNG is right here, and
# tests pass their own seeded Random to check the distribution.
_DRAW = random.Random()  # noqa: S311
# An Island whose clock fell behind (offline for a while, ineligible for the
# jobs placed meanwhile, or new) gets a fresh one before it competes; this
# many at a time, oldest first.
REFRESH_BATCH = 256
# A draw whose winner another placement holds tries the next, this many
# times; when every eligible Island is held at that instant, it waits a few
# milliseconds and starts again, this many rounds.
DRAW_TRIES = 16
DRAW_ROUNDS = 20
# Turns read at a time, in order; more only while they are all behind the clock.
WALK_BATCH = 16
# A draw that met this many turns behind the clock refreshes them for the
# next (refresh_turns, after its transaction): cheaper than meeting them again.
STALE_REFRESH_AFTER = 8
# What a walk reads of each Island.
WALK_FIELDS = ("pk", "host_id", "transport", "karma", "jobs_completed", "draw_next", ASK)
# The walk's SQL by the shape of a job (PostgreSQL): building it through the
# ORM costs about 2.5 ms of CPU, more than the placement's own work. It is
# compiled once per shape with these stand-ins, then run with the job's values.
_WALKS: dict[tuple[Any, ...], tuple[str, list[tuple[str | None, Any]]]] = {}
_STAND_INS: dict[str, Any] = {
    "workload": "archipelag-stand-in-workload",
    "budget": Decimal("0.00031337"),
    "vram": 314_159_265,
    "region": "archipelag-stand-in-region",
    "now": datetime(2001, 2, 3, 4, 5, 6, 789_012, tzinfo=UTC),
}
_STAND_IN_PASSED: list[Any] = []
# A job is placed at most this many times; a third timeout fails it.
MAX_ATTEMPTS = 3


class JobManager(models.Manager["Job"]):
    # --- Giving a job an Island ---------------------------------------------------------

    def submit(
        self,
        spec: JobSpec,
        *,
        island: Island | None = None,
        key: "DispatcherKey | None" = None,
        now: datetime | None = None,
        rng: random.Random | None = None,
    ) -> "Job":
        """Place a job: on an Island drawn among the eligible ones, or on `island` if it may take it.

        One transaction: the Island's slot is counted (jobs_running), the job
        and its first attempt are recorded, and for a NATS Island its
        AssignJob is written to the outbox, which the bridge publishes once
        this commits. Raises NoEligibleIsland (nothing is written, so the same
        job may be submitted again later), IslandIneligible, or DuplicateJob
        when the job_id is already recorded.
        """
        now = now or timezone.now()
        rng = rng or _DRAW
        stale = 0
        try:
            try:
                connection = connections[self.db]
                if island is None and connection.vendor == "postgresql":
                    # Inside a transaction, a savepoint keeps a duplicate's error from ending it.
                    nested = (
                        transaction.atomic(using=self.db) if connection.in_atomic_block else nullcontext()
                    )
                    with nested:
                        job, stale = self._place_at_once(spec, now, key, rng)
                    if job is None:
                        raise NoEligibleIsland(Island.objects.exclusions(spec, now))
                    return job
                if island is None and not transaction.get_connection(self.db).in_atomic_block:
                    DrawClock.ensure()
                with transaction.atomic(using=self.db):
                    if island is None:
                        drawn = Island.objects.draw(spec, now, rng)
                        stale = drawn.stale
                        if drawn.seat is None:
                            raise NoEligibleIsland(Island.objects.exclusions(spec, now))
                        seat = drawn.seat
                    else:
                        seat = Island.objects.reserve(island, spec, now)
                    return self._record(spec, seat, now, key)
            except (IntegrityError, NoEligibleIsland, IslandIneligible):
                # A retry of a recorded job hears so rather than a rule's
                # refusal (a full Island would otherwise refuse its own
                # job); the unique job_id settles two submissions racing.
                existing = self.filter(job_id=spec.job_id).first()
                if existing is None:
                    raise
                raise DuplicateJob(existing) from None
        finally:
            if stale >= STALE_REFRESH_AFTER:
                # Turns left behind: give them fresh ones now, after the
                # placement's transaction (refresh_turns skips locked rows),
                # so the next draws need not read past them.
                Island.objects.refresh_turns(rng)

    def _place_at_once(
        self, spec: JobSpec, now: datetime, key: "DispatcherKey | None", rng: random.Random
    ) -> "tuple[Job | None, int]":
        """submit()'s drawn placement on PostgreSQL, each try one statement that is its own transaction.

        The same draw as Island.objects.draw(), and the same rows as
        _record(), written by one statement of data-modifying CTEs: take the
        turn and the slot (_take_turn's UPDATE), move the clock, insert the
        job, its AssignJob (a NATS Island) and its first attempt, and wake
        the senders. If the turn was taken meanwhile nothing is written and
        the race goes on. Two round trips per placement (the walk, then
        this) instead of a dozen: the benchmark's 1,000 a second.
        """
        connection = connections[self.db]

        def take(row: dict[str, Any], turn: float, following: float) -> "Job | None":
            seat = Seat(row["pk"], row["host_id"], row["transport"], row[ASK])
            job = self._new(spec, seat, now, key)
            attempt = Attempt(number=1, island_id=seat.island_id, assigned_at=now, credits=job.credits)
            steps = [
                (
                    "took",
                    Island.objects._take_turn_sql(),
                    [turn, following, seat.island_id, row["draw_next"]],
                ),
                ("tick", _tick_sql(connection), [turn, turn]),
                ("job", *_insert_select(job, connection, ("island_id", "took.id"), "took")),
            ]
            sources, notify = "job", ""
            if seat.transport == Island.Transport.NATS:
                message = OutboxMessage.objects.unsaved(
                    **OutboxMessage.objects.assign_fields(job, 1, seat.host_id)
                )
                steps.append(("message", *_insert_select(message, connection, ("job_id", "job.id"), "job")))
                sources, notify = "job, message", f", pg_notify('{OUTBOX_CHANNEL}', '')"
                links: tuple[str, ...] = ("job_id", "job.id", "assign_message_id", "message.id")
            else:
                links = ("job_id", "job.id")
            steps.append(("attempt", *_insert_select(attempt, connection, links, sources)))
            sql = "WITH " + ", ".join(f"{name} AS ({step})" for name, step, _ in steps)
            params = [param for _, _, step_params in steps for param in step_params]
            statement = f"{sql} SELECT job.id{notify} FROM {sources}"  # noqa: S608
            _, written = _prepared(connection, statement, params)
            if not written:
                return None
            job.pk = written[0][0]
            job._state.adding, job._state.db = False, self.db
            # What the placement read of its Island, so job.island costs no query.
            known = {"id": seat.island_id, "host_id": seat.host_id, "transport": seat.transport}
            fields = [f.attname for f in Island._meta.concrete_fields if f.attname in known]
            job.island = Island.from_db(self.db, fields, [known[name] for name in fields])
            return job

        return Island.objects.db_manager(self.db).race(spec, now, rng, take)

    def assign(
        self,
        *,
        island: Island,
        job_id: str,
        workload: str,
        credits: Decimal,
        lease: timedelta,
        now: datetime | None = None,
    ) -> "Job":
        """Give `job_id` to `island` for a fixed amount, if it may take it (the explicit form)."""
        spec = JobSpec(job_id=job_id, workload=workload, lease=lease, budget=credits, credits=credits)
        return self.submit(spec, island=island, now=now)

    def _record(self, spec: JobSpec, seat: Seat, now: datetime, key: "DispatcherKey | None") -> "Job":
        job = self._new(spec, seat, now, key)
        job.save(force_insert=True, using=self.db)
        job.begin_attempt(seat, now)
        return job

    def _new(self, spec: JobSpec, seat: Seat, now: datetime, key: "DispatcherKey | None") -> "Job":
        """The job's row for its first attempt on `seat`, not yet saved."""
        credits = spec.credits if spec.credits is not None else _clearing(seat.ask, spec.budget)
        return self.model(
            job_id=spec.job_id,
            island_id=seat.island_id,
            workload=spec.workload,
            runtime=spec.runtime,
            input=spec.input,
            budget=spec.budget.quantize(CREDITS_PLACES),
            requirements=spec.requirements(),
            artefacts=spec.artefacts,
            lease_seconds=int(spec.lease.total_seconds()),
            credits=credits.quantize(CREDITS_PLACES),
            fixed_credits=spec.credits is not None,
            attempt=1,
            assigned_at=now,
            lease_expires_at=now + spec.lease,
            submitted_by=key,
        )

    def _place_again(self, job: "Job", now: datetime, rng: random.Random, exclude: Iterable[Any]) -> bool:
        """Give an unfinished job a new Island; False (and the job left alone) if none is eligible."""
        seat = Island.objects.draw(JobSpec.of(job), now, rng, exclude=exclude).seat
        if seat is None:
            return False
        spec = JobSpec.of(job)
        credits = job.credits if job.fixed_credits else _clearing(seat.ask, job.budget)
        job.island_id, job.attempt, job.state = seat.island_id, job.attempt + 1, Job.State.ASSIGNED
        job.assigned_at, job.lease_expires_at, job.credits = (
            now,
            now + spec.lease,
            credits.quantize(CREDITS_PLACES),
        )
        job.started_at = job.finished_at = job.requeue_until = None
        job.error = ""
        job.save(
            update_fields=[
                "island",
                "attempt",
                "state",
                "assigned_at",
                "lease_expires_at",
                "credits",
                "started_at",
                "finished_at",
                "requeue_until",
                "error",
            ]
        )
        job.begin_attempt(seat, now)
        return True

    # --- What Islands report -----------------------------------------------------------------

    def _of(self, island: Island, job_id: str, *fields: str) -> "Job":
        """The job `job_id` if it is `island`'s now; JobMoved if it was once, JobNotFound if never."""
        job = self.filter(job_id=job_id).only("pk", "island_id", "attempt", *fields).first()
        if job is not None and job.island_id == island.pk:
            return job
        if job is not None and Attempt.objects.filter(job_id=job.pk, island=island).exists():
            logger.info("event=job_report_refused reason=moved job_id=%s island_id=%s", job_id, island.pk)
            raise JobMoved(job_id)
        raise JobNotFound(f"no job {job_id} for this Island")

    def extend_lease(
        self, island: Island, job_id: str, seconds: float, now: datetime | None = None
    ) -> datetime | None:
        """Renew the lease of one of `island`'s running jobs; return the new deadline, or None.

        The lease becomes `now` plus the seconds asked for, capped at
        LEASE_RENEWAL_MAX and at JOB_LEASE_MAX after assignment. A renewal
        never shortens a lease, and a lease that already passed stays passed
        (the job is the watcher's, whether or not it has run yet), so a
        forged renewal can neither make a job time out early nor revive one.
        The write is a compare-and-set on the very lease it read, like the
        watcher's, so of a renewal and a timeout only one takes effect.
        """
        now = now or timezone.now()
        job = self._of(island, job_id, "state", "assigned_at", "lease_expires_at")
        if job.state not in Job.ACTIVE_STATES or job.lease_expires_at <= now:
            return None
        asked = min(timedelta(seconds=max(seconds, 0)), LEASE_RENEWAL_MAX)
        wanted = min(now + asked, job.assigned_at + JOB_LEASE_MAX)
        if wanted <= job.lease_expires_at:
            return job.lease_expires_at
        won = self.filter(
            pk=job.pk,
            island=island,
            attempt=job.attempt,
            state__in=Job.ACTIVE_STATES,
            lease_expires_at=job.lease_expires_at,
        ).update(lease_expires_at=wanted)
        return wanted if won else None

    def waiting_for(self, island: Island) -> "models.QuerySet[Job]":
        """Jobs given to `island` that it has not started yet, oldest first."""
        return self.filter(island=island, state=Job.State.ASSIGNED).order_by("assigned_at", "pk")

    def apply_status(
        self,
        island: Island,
        job_id: str,
        state: str,
        error: str | None = None,
        now: datetime | None = None,
    ) -> StatusReport:
        """Apply a state the Island reports for one of its jobs (HTTP and NATS alike).

        A terminal state is applied exactly once: a conditional UPDATE from an
        active state of the Island's own attempt decides, by its row count,
        and the Island's counters, its karma (islands.signals.job_finished) and
        the attempt's row change in the same transaction. A repeat of the
        state the job ended in is accepted and ignored (JetStream redelivers);
        a different terminal state raises JobStateConflict; a report on a job
        that moved on raises JobMoved. Active states only move forward, and
        late or repeated ones are ignored. Times are the coordinator's, not
        the agent's clock, because karma is computed from them.
        """
        now = now or timezone.now()
        target = Job.State(state)
        if target in (Job.State.TIMED_OUT, Job.State.ASSIGNED, Job.State.QUEUED):
            raise ValueError(f"an Island cannot report {target}")
        with transaction.atomic():
            job = self._of(island, job_id, "credits")
            mine = self.filter(pk=job.pk, island=island, attempt=job.attempt)
            if target in Job.TERMINAL_STATES:
                # PostgreSQL stores no NUL; the rest of the text is worth keeping.
                kept = (error or "").replace("\x00", "\ufffd")[:JOB_ERROR_MAX_LENGTH]
                if mine.filter(state__in=Job.ACTIVE_STATES).update(state=target, finished_at=now, error=kept):
                    job.end_attempt(Attempt.Outcome(target.value), now)
                    return StatusReport(applied=True, state=target)
                current = Job.State(self.filter(pk=job.pk).values_list("state", flat=True).get())
                if current != target:
                    raise JobStateConflict(job_id, current)
                return StatusReport(applied=False, state=current)
            earlier = (
                [Job.State.ASSIGNED]
                if target == Job.State.STARTED
                else [Job.State.ASSIGNED, Job.State.STARTED]
            )
            if mine.filter(state__in=earlier).update(
                state=target, started_at=Coalesce(F("started_at"), models.Value(now))
            ):
                Attempt.objects.filter(job_id=job.pk, number=job.attempt, started_at__isnull=True).update(
                    started_at=now
                )
                return StatusReport(applied=True, state=target)
            current = Job.State(self.filter(pk=job.pk).values_list("state", flat=True).get())
            return StatusReport(applied=False, state=current)

    # --- The dispatcher's cancel -----------------------------------------------------------

    def cancel(self, job_id: str, now: datetime | None = None) -> "Job":
        """Withdraw a job that has not ended: no karma for its Island, and no pay.

        A NATS Island is sent `{"job_id"}` on host.{id}.cancel and its
        AssignJob is deleted from the stream; an HTTP Island sees it in its
        poll. Raises JobNotFound, or JobStateConflict for a job that ended.
        """
        now = now or timezone.now()
        with transaction.atomic():
            job = self.select_for_update().filter(job_id=job_id).first()
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            if job.state in Job.TERMINAL_STATES:
                raise JobStateConflict(job_id, job.state)
            was = job.state
            job.state, job.finished_at, job.error = Job.State.CANCELLED, now, "cancelled by the dispatcher"
            job.save(update_fields=["state", "finished_at", "error"])
            if was != Job.State.QUEUED:
                job.end_attempt(Attempt.Outcome.WITHDRAWN, now)
        logger.info("event=job_cancelled job_id=%s", job_id)
        return job

    # --- The watcher's steps ---------------------------------------------------------------

    def time_out_expired(self, now: datetime, limit: int = WATCH_BATCH) -> list[str]:
        """Time out the attempts whose lease passed with no final state, and place their jobs again.

        Like the silences: a compare-and-set per job on its attempt and the
        lease that passed, dated at that deadline, so two watchers (or a late
        report racing one) settle each attempt once. The Island is charged
        the timeout (counters, karma); up to MAX_ATTEMPTS the job then waits
        (QUEUED) for place_queued to give it another eligible Island, never
        one that timed out on it, for at most one more lease. Returns the
        job ids of the attempts timed out.
        """
        timed_out: list[str] = []
        due = (
            self.filter(state__in=Job.ACTIVE_STATES, lease_expires_at__lte=now)
            .order_by("lease_expires_at")
            .values_list("pk", "attempt", "lease_expires_at")
        )
        for pk, number, deadline in due[:limit]:
            with transaction.atomic():
                won = self.filter(
                    pk=pk, attempt=number, state__in=Job.ACTIVE_STATES, lease_expires_at=deadline
                ).update(
                    state=Job.State.TIMED_OUT,
                    finished_at=deadline,
                    error="the lease expired before the Island reported a final state",
                )
                if not won:
                    continue
                job = self.get(pk=pk)
                job.end_attempt(Attempt.Outcome.TIMED_OUT, deadline, at=now)
                timed_out.append(job.job_id)
                if number < MAX_ATTEMPTS:
                    # Placed again by place_queued, in a transaction of its
                    # own: this one holds the timed-out Island, and a draw
                    # holding one Island must never wait for another.
                    job.state, job.island_id = Job.State.QUEUED, None
                    job.finished_at, job.requeue_until = None, now + timedelta(seconds=job.lease_seconds)
                    job.error = "waiting for an eligible Island after a timeout"
                    job.save(update_fields=["state", "island", "finished_at", "requeue_until", "error"])
        return timed_out

    def place_queued(self, now: datetime, limit: int = WATCH_BATCH, rng: random.Random | None = None) -> int:
        """Place the jobs waiting for an Island after a timeout; fail those that waited a lease too long.

        A compare-and-set on the job's state and attempt decides between two
        watchers; the loser's reservation rolls back with its transaction.
        Returns how many jobs moved (placed or failed).
        """
        rng = rng or _DRAW
        moved = 0
        queued = (
            self.filter(state=Job.State.QUEUED)
            .order_by("requeue_until")
            .values_list("pk", "attempt", "requeue_until")[:limit]
        )
        for pk, number, until in queued:
            try:
                with transaction.atomic():
                    job = (
                        self.select_for_update().filter(pk=pk, state=Job.State.QUEUED, attempt=number).first()
                    )
                    if job is None:
                        continue  # another watcher moved it
                    if until is not None and until <= now:
                        job.state, job.finished_at = Job.State.TIMED_OUT, until
                        job.error = "no eligible Island took it within a lease of its last timeout"
                        job.save(update_fields=["state", "finished_at", "error"])
                        moved += 1
                        continue
                    timed_out_on = Attempt.objects.filter(job=job, outcome=Attempt.Outcome.TIMED_OUT)
                    if self._place_again(
                        job, now, rng, list(timed_out_on.values_list("island_id", flat=True))
                    ):
                        moved += 1
            except IntegrityError:
                continue
        return moved


def _like(stand_in: Any, value: Any) -> Any:
    """`value` in place of `stand_in`, wrapped as the ORM wrapped the stand-in (psycopg's Int4, say)."""
    kind = type(stand_in)
    if value is None or type(value) is kind or kind is type(_STAND_INS["now"]):
        return value
    return kind(value)


def _prepared(
    connection: Any, sql: str, params: Sequence[Any], prepare: bool = True
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run `sql` with its parameters bound server-side (PostgreSQL), prepared: its columns and rows.

    Placement's statements are the same text every time; preparing spares
    PostgreSQL planning them again, and binding server-side spares quoting
    each parameter in Python. Same connection, same transaction; errors
    arrive as Django's (IntegrityError).
    """
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(sql, params, prepare=prepare)
        if cursor.description is None:
            return [], []
        return [str(column.name) for column in cursor.description], cursor.fetchall()


def _tick_sql(connection: Any) -> str:
    """Move the draw's clock to a turn taken in the same statement (parameters: turn, turn)."""
    return (
        f"UPDATE {connection.ops.quote_name(DrawClock._meta.db_table)} SET time = %s "  # noqa: S608
        "WHERE id = 1 AND time < %s AND EXISTS (SELECT 1 FROM took)"
    )


def _insert_select(
    row: models.Model, connection: Any, links: tuple[str, ...], sources: str
) -> tuple[str, list[Any]]:
    """`INSERT … SELECT … FROM sources RETURNING id` of an unsaved row.

    `links` pairs columns with SQL (other steps' ids): ("job_id", "job.id").
    Every other column comes from the row as Django would save it (its
    defaults, its fields' conversions), so the model stays the one place its
    columns are described.
    """
    sql, fields = _insert_sql(type(row), connection.alias, links, sources)
    return sql, [field.get_db_prep_save(field.pre_save(row, add=True), connection) for field in fields]


@functools.cache
def _insert_sql(
    model: type[models.Model], alias: str, links: tuple[str, ...], sources: str
) -> tuple[str, list[Any]]:
    """_insert_select's SQL, and the fields its parameters come from, in order."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    linked = dict(zip(links[::2], links[1::2], strict=True))
    columns, values, fields = [], [], []
    for column in model._meta.concrete_fields:
        name = column.column or column.attname
        if name in linked:
            columns.append(quote(name))
            values.append(linked[name])
        elif not column.primary_key:
            columns.append(quote(name))
            values.append(f"CAST(%s AS {column.db_type(connection)})")
            fields.append(column)
    table = quote(model._meta.db_table)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(values)} FROM {sources} RETURNING id",  # noqa: S608
        fields,
    )


def _clearing(ask: Decimal, budget: Decimal) -> Decimal:
    """What a job pays: the Island's ask, to the credit's four places (up: never below the ask)."""
    return min(budget, Decimal(ask).quantize(CREDITS_PLACES, rounding=ROUND_CEILING))


class Job(models.Model):
    """The ledger: one row per job, placed on an Island (or waiting for one).

    The row describes the job's current attempt (its Island, times, lease and
    pay); each attempt also has a row of its own (Attempt), which keeps the
    history when a job moves. The Island's jobs_completed, jobs_failed,
    earnings and jobs_running are sums over attempts, kept as counters so
    "Your Islands" and placement read them without aggregating.
    """

    class State(models.TextChoices):
        QUEUED = "queued", "Waiting for an Island"
        ASSIGNED = "assigned", "Assigned"
        STARTED = "started", "Started"
        STREAMING = "streaming", "Streaming"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"
        TIMED_OUT = "timed_out", "Timed out"

    ACTIVE_STATES = (State.ASSIGNED, State.STARTED, State.STREAMING)
    TERMINAL_STATES = (State.SUCCEEDED, State.FAILED, State.CANCELLED, State.TIMED_OUT)

    # The dispatcher's id for the job; the agent reports status by it.
    job_id = models.CharField(max_length=128, unique=True)
    # The Island of the current attempt; none while the job waits for one.
    # Islands are never deleted, only removed, so their ledger stays whole.
    island = models.ForeignKey(Island, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs")
    workload = models.CharField(max_length=128)
    runtime = models.CharField(max_length=16, default="container")
    # What the job is given (any JSON), and what the agent needs to run it
    # (its AssignJob's artefact fields), both passed through as they came.
    input = models.JSONField(null=True, blank=True)
    artefacts = models.JSONField(default=dict, blank=True)
    # What an Island must have (min_vram_mb, region, platform).
    requirements = models.JSONField(default=dict, blank=True)
    # The most it may pay, and what the current attempt pays (the Island's
    # ask, or a fixed amount when the dispatcher named one: fixed_credits).
    budget = models.DecimalField(max_digits=12, decimal_places=4)
    credits = models.DecimalField(max_digits=12, decimal_places=4)
    fixed_credits = models.BooleanField(default=False)
    lease_seconds = models.PositiveIntegerField()
    state = models.CharField(max_length=16, choices=State.choices, default=State.ASSIGNED)
    # Which attempt the row describes (1 to MAX_ATTEMPTS).
    attempt = models.PositiveSmallIntegerField(default=1)
    assigned_at = models.DateTimeField(default=timezone.now)
    lease_expires_at = models.DateTimeField()
    # When the Island first said it started (or streamed): karma rewards quick starts.
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # A QUEUED job fails if no Island takes it by then.
    requeue_until = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    submitted_by = models.ForeignKey(
        "DispatcherKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )

    objects = JobManager()

    class Meta:
        indexes = [
            # Serves an Island's ledger, newest first (admin, karma).
            models.Index(fields=["island", "-assigned_at"], name="job_island_idx"),
            # Serves the Island's poll for work: its jobs not started yet.
            models.Index(
                fields=["island", "assigned_at"], condition=Q(state="assigned"), name="job_waiting_idx"
            ),
            # Serves the watcher's timeout sweep: active jobs by lease deadline.
            models.Index(
                fields=["lease_expires_at"],
                condition=Q(state__in=["assigned", "started", "streaming"]),
                name="job_lease_idx",
            ),
            # Serves the watcher's second chances: jobs waiting for an Island.
            models.Index(fields=["requeue_until"], condition=Q(state="queued"), name="job_queued_idx"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(credits__gte=0), name="job_credits_not_negative"),
            models.CheckConstraint(condition=Q(credits__lte=F("budget")), name="job_credits_within_budget"),
            # Only a job waiting for an Island (or ended while waiting) has none.
            models.CheckConstraint(
                condition=Q(island__isnull=False) | Q(state__in=["queued", "cancelled", "timed_out"]),
                name="job_island_unless_waiting",
            ),
        ]

    def __str__(self) -> str:
        return self.job_id

    def assign_job(self) -> dict[str, Any]:
        """The agent's AssignJob for this attempt, as published and as HTTP Islands poll it."""
        return {
            "job_id": self.job_id,
            "workload_id": self.workload,
            "input": self.input,
            "lease_expires": int(self.lease_expires_at.timestamp() * 1000),
            "runtime_type": self.runtime,
            **self.artefacts,
        }

    def begin_attempt(self, seat: Seat, now: datetime) -> "Attempt":
        """Record the attempt this row now describes; a NATS Island's AssignJob goes to the outbox."""
        attempt = Attempt.objects.create(
            job=self, number=self.attempt, island_id=seat.island_id, assigned_at=now, credits=self.credits
        )
        if seat.transport == Island.Transport.NATS:
            attempt.assign_message = OutboxMessage.objects.assign(self, attempt, seat.host_id)
            attempt.save(update_fields=["assign_message"])
        return attempt

    def end_attempt(
        self, outcome: "Attempt.Outcome", finished_at: datetime, at: datetime | None = None
    ) -> None:
        """Close the current attempt: its row, its Island's counters and karma, and its AssignJob.

        Called in the transaction that won the job's state change, so it runs
        once per attempt. `at` is when this is recorded (the watcher's clock),
        which karma keeps apart from when it happened.
        """
        attempt = Attempt.objects.select_related("island", "assign_message").get(
            job=self, number=self.attempt
        )
        assign = attempt.assign_message
        if outcome == Attempt.Outcome.TIMED_OUT and assign is not None and assign.sent_at is None:
            # Its AssignJob never reached JetStream (NATS was down, or the
            # sender gave up): the Island never had the job, so this is
            # not its failure. Neither counted nor charged.
            outcome = Attempt.Outcome.UNDELIVERED
        attempt.outcome, attempt.finished_at = outcome, finished_at
        attempt.save(update_fields=["outcome", "finished_at"])
        counters: dict[str, Any] = {"jobs_running": F("jobs_running") - 1}
        if outcome == Attempt.Outcome.SUCCEEDED:
            counters |= {
                "jobs_completed": F("jobs_completed") + 1,
                "earnings": F("earnings") + attempt.credits,
            }
        elif outcome in (Attempt.Outcome.FAILED, Attempt.Outcome.TIMED_OUT):
            counters |= {"jobs_failed": F("jobs_failed") + 1}
        # A cancelled, withdrawn or undelivered job neither counts nor pays.
        Island.objects.filter(pk=attempt.island_id, jobs_running__gt=0).update(**counters)
        announce_fleet([(attempt.island.owner_id, attempt.island_id)])
        job_finished.send(sender=Job, attempt_pk=attempt.pk, now=at or finished_at)
        if attempt.island.transport == Island.Transport.NATS:
            if outcome == Attempt.Outcome.WITHDRAWN:
                OutboxMessage.objects.cancel(self, attempt.island.host_id)
            if attempt.assign_message is not None:
                # Never run later by an agent coming back to its stream.
                OutboxMessage.objects.withdraw(attempt.assign_message)


class Attempt(models.Model):
    """One placement of a job on an Island: who, when, and how it ended."""

    class Outcome(models.TextChoices):
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled by the Island"
        WITHDRAWN = "withdrawn", "Cancelled by the dispatcher"
        TIMED_OUT = "timed_out", "Timed out"
        UNDELIVERED = "undelivered", "Timed out, never delivered to the Island"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveSmallIntegerField()
    island = models.ForeignKey(Island, on_delete=models.CASCADE, related_name="attempts")
    assigned_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Empty while the attempt runs.
    outcome = models.CharField(max_length=16, choices=Outcome.choices, blank=True)
    credits = models.DecimalField(max_digits=12, decimal_places=4)
    # Its AssignJob, for a NATS Island: deleted from the stream when the job moves on.
    assign_message = models.ForeignKey(
        "OutboxMessage", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["job", "number"]
        constraints = [
            models.UniqueConstraint(fields=["job", "number"], name="attempt_once_per_number"),
        ]
        indexes = [
            # Serves an Island's history of attempts, newest first (its page, the admin).
            models.Index(fields=["island", "-assigned_at"], name="attempt_island_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.job} #{self.number}"

    @property
    def took(self) -> timedelta | None:
        """From assignment to its final state; None while it runs."""
        return None if self.finished_at is None else self.finished_at - self.assigned_at


class OutboxMessageManager(models.Manager["OutboxMessage"]):
    def assign(self, job: Job, attempt: Attempt, host_id: str) -> "OutboxMessage":
        """The AssignJob of an attempt, for the bridge to publish into the JOBS stream once this commits."""
        return self._write(**self.assign_fields(job, attempt.number, host_id))

    def assign_fields(self, job: Job, number: int, host_id: str) -> dict[str, Any]:
        return {
            "kind": OutboxMessage.Kind.ASSIGN,
            "job": job,
            "subject": f"host.{host_id}.jobs",
            "payload": job.assign_job(),
            # JetStream drops a second publish with the same id within the
            # stream's duplicate window: a sender killed between publish and
            # mark publishes again, and the agent still gets one AssignJob.
            "msg_id": f"{job.job_id}:{number}",
        }

    def cancel(self, job: Job, host_id: str) -> "OutboxMessage":
        """`{"job_id"}` on the agent's cancel subject, for a job it may be running."""
        return self._write(
            kind=OutboxMessage.Kind.CANCEL,
            job=job,
            subject=f"host.{host_id}.cancel",
            payload={"job_id": job.job_id},
            msg_id=f"{job.job_id}:{job.attempt}:cancel",
        )

    def withdraw(self, assign: "OutboxMessage", now: datetime | None = None) -> None:
        """Make sure an AssignJob is never run: unsent, it is never sent; sent, it is deleted from JOBS.

        An assignment no sender has ever tried to send is withdrawn in place.
        One that is sent, being sent, or was tried (a sender that failed or
        died mid-send may have published it: `tries` counts the claims that
        may have, and an expired claim proves nothing) gets a DELETE that the
        sender carries out once it knows where the message is.
        """
        now = now or timezone.now()
        never_tried = Q(claimed_until__isnull=True, tries=0)
        if self.filter(never_tried, pk=assign.pk, sent_at__isnull=True, withdrawn_at__isnull=True).update(
            withdrawn_at=now
        ):
            return
        self._write(
            kind=OutboxMessage.Kind.DELETE,
            job=assign.job,
            subject=assign.subject,
            payload={},
            msg_id=f"{assign.msg_id}:delete",
            target=assign,
        )

    def unsaved(self, **fields: Any) -> "OutboxMessage":
        """A message with `payload` (any JSON) encoded, not yet saved."""
        payload = fields.pop("payload")
        return self.model(payload=msgspec.json.encode(payload).decode(), **fields)

    def _write(self, **fields: Any) -> "OutboxMessage":
        message = self.unsaved(**fields)
        message.save(force_insert=True, using=self.db)
        connection = connections[self.db]
        if connection.vendor == "postgresql":
            # Wakes the bridges' senders (they LISTEN); PostgreSQL delivers it
            # when this transaction commits, and never if it rolls back. They
            # poll as well, so a lost notification only delays a message.
            with connection.cursor() as cursor:
                cursor.execute(f"NOTIFY {OUTBOX_CHANNEL}")
        return message

    def due(self, now: datetime) -> "models.QuerySet[OutboxMessage]":
        """Messages waiting to be sent, oldest first."""
        return self.filter(sent_at__isnull=True, withdrawn_at__isnull=True, available_at__lte=now).order_by(
            "pk"
        )

    # === The sender's side (archipelag/nats.py, OutboxSender; docs/dispatch.md#delivery) ====
    # Everything above writes messages in the transaction that decides them;
    # these methods are how the bridges' senders take, settle and hand back
    # what they send. A sender holds no transaction while it talks to NATS.

    def claim(self, now: datetime, until: datetime, limit: int) -> list["OutboxMessage"]:
        """Take up to `limit` due messages, oldest first, for one sender until `until`.

        No other sender takes them before `until` passes. On PostgreSQL the
        due rows are locked with SKIP LOCKED, so concurrent senders split
        them without waiting for each other, and claimed in the same short
        transaction; elsewhere each row is claimed by a conditional UPDATE
        whose row count decides. A sender that dies holding a claim hands
        its messages over when the claim passes. `tries` counts the claims
        that may have published (see release()), so withdraw() never takes
        a message a sender may have published for one never sent. An
        AssignJob a DELETE targets is never claimed again: its job moved on
        while a sender held it, and the DELETE settles it (settle_target()).
        """
        claimable = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
        targeted = models.Exists(OutboxMessage.objects.filter(target=models.OuterRef("pk")))
        due = self.due(now).filter(claimable).exclude(targeted).values_list("pk", flat=True)
        claim = {"claimed_until": until, "tries": F("tries") + 1}
        with transaction.atomic(using=self.db):
            if connections[self.db].features.has_select_for_update_skip_locked:
                pks = list(due.select_for_update(skip_locked=True)[:limit])
                self.filter(pk__in=pks).update(**claim)
            else:
                unsent = Q(sent_at__isnull=True, withdrawn_at__isnull=True)
                pks = [pk for pk in due[:limit] if self.filter(claimable, unsent, pk=pk).update(**claim)]
            return list(self.filter(pk__in=pks).order_by("pk"))

    def mark_sent(self, message: "OutboxMessage", now: datetime, stream_seq: int | None = None) -> bool:
        """Record that `message` went out (an AssignJob: where JetStream stored it).

        False if it was withdrawn while it was being sent (its job moved on,
        and a DELETE found nothing to delete yet): the sender then deletes
        what it has just published itself. A message another sender marked
        meanwhile (a claim that passed) counts as sent: JetStream gave both
        the same sequence.
        """
        if self.filter(pk=message.pk, sent_at__isnull=True, withdrawn_at__isnull=True).update(
            sent_at=now, stream_seq=stream_seq, claimed_until=None, last_error=""
        ):
            return True
        return self.filter(pk=message.pk, sent_at__isnull=False).exists()

    def release(
        self,
        message: "OutboxMessage",
        now: datetime,
        *,
        tried: bool,
        delay: timedelta = timedelta(0),
        error: str = "",
    ) -> None:
        """Hand a claimed message back, to be taken again after `delay`.

        `tried` says a send went out whose outcome is unknown (a timeout, a
        connection lost mid-request): its claim keeps counting in `tries`.
        A message that certainly never left (not connected, a stop before
        its turn, a DELETE waiting for its target) gives its claim back.
        """
        self.filter(pk=message.pk, sent_at__isnull=True, withdrawn_at__isnull=True).update(
            claimed_until=None,
            available_at=now + delay,
            # Only a sender that claimed it releases it, so its claim is in `tries`.
            tries=F("tries") if tried else F("tries") - 1,
            last_error=error[: OutboxMessage._meta.get_field("last_error").max_length],
        )

    def give_up(self, message: "OutboxMessage", now: datetime, reason: str) -> None:
        """Stop trying a message (never sent, or sent with an unknown outcome: `tries` says which)."""
        self.filter(pk=message.pk, sent_at__isnull=True, withdrawn_at__isnull=True).update(
            withdrawn_at=now, claimed_until=None, last_error=f"gave up: {reason}"[:500]
        )

    def settle_target(self, delete: "OutboxMessage", now: datetime) -> tuple[str, "OutboxMessage"]:
        """Where the AssignJob a DELETE targets stands, and that AssignJob as it is now.

        - "sent": it is (or was) in the stream at `stream_seq`;
        - "never_sent": no sender ever published it: nothing to delete;
        - "in_flight": a sender holds it now: ask again once it is done;
        - "unknown": a sender tried and failed, or died holding it, so it may
          sit in the stream under its msg_id. It is withdrawn here (a
          compare-and-set on the claim it had), so no sender tries it again,
          and the DELETE looks for it in the stream.
        """
        assert delete.target_id is not None
        for _ in range(4):
            target = self.get(pk=delete.target_id)
            if target.sent_at is not None:
                return "sent", target
            if target.withdrawn_at is not None:
                return ("unknown" if target.tries else "never_sent"), target
            if target.claimed_until is not None and target.claimed_until >= now:
                return "in_flight", target
            if self.filter(
                pk=target.pk,
                sent_at__isnull=True,
                withdrawn_at__isnull=True,
                claimed_until=target.claimed_until,
            ).update(withdrawn_at=now, last_error="withdrawn: its job moved on before it was sent"):
                return ("unknown" if target.tries else "never_sent"), target
        # It keeps changing under us (claimed, released, claimed): a sender is on it.
        return "in_flight", target

    # === End of the sender's side ================================================================


# The PostgreSQL channel the bridges LISTEN on for new outbox messages.
OUTBOX_CHANNEL = "archipelag_outbox"


class OutboxMessage(models.Model):
    """Something to say to an Island over NATS, written in the transaction that decided it.

    The bridge sends it after the commit (archipelag/nats.py): never from
    inside a transaction, and never lost when a process dies between the
    commit and the send. A crash after the send and before it is marked
    repeats the send with the same `msg_id`, which JetStream de-duplicates.
    """

    class Kind(models.TextChoices):
        ASSIGN = "assign", "AssignJob into the JOBS stream"
        CANCEL = "cancel", "Cancel on the Island's cancel subject"
        DELETE = "delete", "Delete an AssignJob from the JOBS stream"

    kind = models.CharField(max_length=8, choices=Kind.choices)
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="outbox")
    # Without the bridge's --subject-prefix (tests run bridges on prefixes).
    subject = models.CharField(max_length=200)
    payload = models.TextField()
    msg_id = models.CharField(max_length=200, unique=True)
    # For a DELETE: the AssignJob it deletes.
    target = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    # Not to be tried before then (a failed send backs off).
    available_at = models.DateTimeField(default=timezone.now)
    # A sender that claimed it and may be sending it now; another sender
    # takes it over once this passes.
    claimed_until = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    # An AssignJob whose job moved on before it was sent: never sent.
    withdrawn_at = models.DateTimeField(null=True, blank=True)
    tries = models.PositiveIntegerField(default=0)
    last_error = models.CharField(max_length=500, blank=True)
    # Where JetStream stored an AssignJob, for its deletion.
    stream_seq = models.PositiveBigIntegerField(null=True, blank=True)

    objects = OutboxMessageManager()

    class Meta:
        indexes = [
            # Serves the senders: what is still to be sent, oldest first.
            models.Index(
                fields=["available_at", "id"],
                condition=Q(sent_at__isnull=True, withdrawn_at__isnull=True),
                name="outbox_due_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.msg_id}"


class DispatcherKeyManager(models.Manager["DispatcherKey"]):
    def issue(self, name: str) -> tuple["DispatcherKey", str]:
        """Create a key and return it with its plaintext, which is never stored."""
        key = DISPATCHER_KEY_PREFIX + generate_secret()
        return self.create(name=name, key_hash=hash_secret(key)), key

    def authenticate(self, key: str) -> "DispatcherKey | None":
        if not key.startswith(DISPATCHER_KEY_PREFIX) or len(key) > 128:
            return None
        # Raw: every submission asks this, and compiling the ORM's query
        # cost more CPU than the rest of the lookup (docs/performance.md).
        table = connections[self.db].ops.quote_name(self.model._meta.db_table)
        found = self.raw(
            f"SELECT * FROM {table} WHERE key_hash = %s AND revoked_at IS NULL",  # noqa: S608
            [hash_secret(key)],
        )
        return next(iter(found), None)


class DispatcherKey(models.Model):
    """A credential for the dispatcher (or a staff script) to record jobs.

    Only the SHA-256 of the key is kept: like Island tokens it has 256 random
    bits, so a plain hash is enough and lookups stay one indexed query.
    """

    name = models.CharField(max_length=100, help_text="Who or what uses this key.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = DispatcherKeyManager()

    def __str__(self) -> str:
        return self.name

    def revoke(self, now: datetime | None = None) -> None:
        self.revoked_at = now or timezone.now()
        self.save(update_fields=["revoked_at"])


class IslandKeyManager(models.Manager["IslandKey"]):
    def owned_by(self, user: "User") -> "models.QuerySet[IslandKey]":
        return self.filter(owner=user).select_related("island").order_by("-created_at", "-pk")

    def issue(self, owner: "User", count: int = 1, now: datetime | None = None) -> list["IssuedKey"]:
        """Mint `count` keys, each with its own host id; the secrets are returned, never stored."""
        if not 1 <= count <= ISLAND_KEY_BATCH_MAX:
            raise ValueError(f"count must be between 1 and {ISLAND_KEY_BATCH_MAX}")
        now = now or timezone.now()
        issued = []
        for _ in range(count):
            secret = generate_secret()
            key = IslandKey(
                owner=owner,
                username=ISLAND_KEY_USER_PREFIX + secrets.token_hex(8),
                secret_hash=hash_secret(secret),
                host_id=str(uuid.uuid4()),
                created_at=now,
                expires_at=now + ISLAND_KEY_UNUSED_TTL,
            )
            issued.append(IssuedKey(key, secret))
        # One transaction: a batch is minted whole or not at all.
        with transaction.atomic():
            self.bulk_create([item.key for item in issued])
        return issued

    def authenticate(self, username: str, secret: str, now: datetime | None = None) -> "IslandKey | None":
        """The usable key these credentials name, or None (unknown, wrong secret, revoked, expired)."""
        if not username.startswith(ISLAND_KEY_USER_PREFIX) or len(username) > 64 or len(secret) > 128:
            return None
        key = self.filter(username=username).first()
        if key is None or not hmac.compare_digest(key.secret_hash, hash_secret(secret)):
            return None
        return key if key.usable_at(now or timezone.now()) else None

    def link_host(
        self,
        host_id: str,
        capabilities: Capabilities | None,
        version: str | None,
        now: datetime | None = None,
    ) -> "Island | None":
        """The keyed host's Island, created for the key's owner on its first registration.

        None if no usable key minted this host id. No code is needed: whoever
        minted the key chose to own this host. A registration only fills in
        hardware the Island has not reported yet, never rewrites it:
        registrations travel on a subject every Island may publish on, so a
        later one could be forged by another Island; heartbeats (on the
        host's own subject) keep it current. Filling in matters because the
        agent's pairing request (no hardware) may be handled before the
        RegisterHost it published just before it.
        """
        now = now or timezone.now()
        key = self.filter(host_id=host_id).select_related("island").first()
        if key is None or not key.usable_at(now):
            return None
        linked = Island.objects.linked_host(host_id)
        if linked is not None:
            if linked.owner_id != key.owner_id:
                # Paired by code to another account before the key was used:
                # that link stands; the key does not move it.
                return linked
            if key.island_id != linked.pk:
                self.filter(pk=key.pk).update(island=linked)
            missing = {
                name: value
                for name, value in (capabilities or Capabilities()).island_fields().items()
                if getattr(linked, name) in (None, "", [], {})
            }
            if version and not linked.agent_version:
                missing["agent_version"] = version
            for name, value in missing.items():
                # Only where the column is still empty, so of two racing
                # registrations the first fills it and the second changes nothing.
                empty = {name: ""} if isinstance(value, str) else {f"{name}__isnull": True}
                Island.objects.filter(pk=linked.pk, **empty).update(**{name: value})
                setattr(linked, name, value)
            return linked
        island = Island(
            owner_id=key.owner_id,
            host_id=host_id,
            kind=Island.Kind.DESKTOP,
            transport=Island.Transport.NATS,
            agent_version=version or "",
            paired_at=now,
        )
        island.take_capabilities(capabilities or Capabilities())
        try:
            with transaction.atomic():
                island = Island.objects.link(island)
                self.filter(pk=key.pk).update(island=island)
        except IntegrityError:
            # Another message of the same host (its pairing ask, say) linked
            # it first: fill in what that one lacked, as above.
            if Island.objects.linked_host(host_id) is None:
                raise
            return self.link_host(host_id, capabilities, version, now)
        logger.info(
            "event=island_linked channel=key user_id=%s island_id=%s host_id=%s",
            key.owner_id,
            island.pk,
            host_id,
        )
        return island


class IslandKey(models.Model):
    """A per-Island NATS credential, minted before the Island first connects.

    Like a Tailscale pre-authorised key: the owner pastes its `host_id` and
    `nats_url` into the agent's config.toml, and the NATS auth callout
    (archipelag/nats_auth.py) lets that connection speak only for that host
    id. Only the SHA-256 of the secret is kept; it has 256 random bits.
    """

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="island_keys")
    # The NATS username. Unique, so the callout finds a key with one indexed lookup.
    username = models.CharField(max_length=64, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    host_id = models.CharField(max_length=64, unique=True, editable=False)
    # The Island this key's host registered as, once it has.
    island = models.ForeignKey(Island, on_delete=models.SET_NULL, null=True, blank=True, related_name="keys")
    created_at = models.DateTimeField(default=timezone.now)
    # A key never used by this time is dead; once used it lasts until revoked.
    expires_at = models.DateTimeField()
    first_used_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = IslandKeyManager()

    class Meta:
        indexes = [
            # /settings lists a user's keys, newest first.
            models.Index(fields=["owner", "-created_at"], name="islandkey_owner_created"),
        ]

    def __str__(self) -> str:
        return self.username

    def usable_at(self, now: datetime) -> bool:
        if self.revoked_at is not None:
            return False
        return self.first_used_at is not None or now < self.expires_at

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.first_used_at is None:
            return "unused" if now < self.expires_at else "expired"
        return "active"

    def revoke(self, now: datetime | None = None) -> bool:
        """Revoke once; True if this call did it. Conditional, so two clicks record one time."""
        now = now or timezone.now()
        done = IslandKey.objects.filter(pk=self.pk, revoked_at__isnull=True).update(revoked_at=now)
        if done:
            self.revoked_at = now
        return bool(done)


@dataclass(frozen=True)
class IssuedKey:
    """A freshly minted key with its secret: shown once, then only the hash remains."""

    key: IslandKey
    secret: str

    @property
    def nats_url(self) -> str:
        return agent_nats_url(self.key.username, self.secret)

    @property
    def config_lines(self) -> str:
        """The agent's config.toml lines. `host_id` is top-level; `nats_url` is under [coordinator]."""
        return f'host_id = "{self.key.host_id}"\n\n[coordinator]\nnats_url = "{self.nats_url}"\n'


def agent_nats_url(username: str, secret: str) -> str:
    """NATS_PUBLIC_URL with the credentials in it, as the agent parses it (never percent-decoded)."""
    scheme, _, rest = settings.NATS_PUBLIC_URL.partition("://")
    hostport = rest.rsplit("@", 1)[-1].rstrip("/")
    return f"{scheme}://{username}:{secret}@{hostport}"
