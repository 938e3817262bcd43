import enum
import functools
import logging
import operator
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec
import psycopg
from django.conf import settings
from django.db import IntegrityError, connections, models, transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from archipelag.secrets import generate_secret, hash_secret
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
# Which cargo runtimes an Island can run, until Islands report it themselves
# in heartbeats (supported_runtimes; see runtime_capability): desktops and
# servers run containers and WASM; a phone runs the one runtime its app
# reported when pairing, CoreML on iOS and ONNX on Android.
DESKTOP_RUNTIMES = frozenset({"container", "wasm"})
MOBILE_RUNTIMES = frozenset({"coreml", "onnx"})
# How many overdue Islands (and jobs) one watcher step handles; the next
# step continues where it stopped.
WATCH_BATCH = 500
DISPATCHER_KEY_PREFIX = "dsp_"
# Agents send whole stack traces as errors; the ledger keeps the start.
JOB_ERROR_MAX_LENGTH = 2000
# An Island renews the lease of a job it is running (NATS `host.{id}.lease`,
# the agent asks for 60 s every 30 s). One renewal reaches at most this far
# ahead, and none carries a job past the longest lease a dispatcher may give.
LEASE_RENEWAL_MAX = timedelta(minutes=5)
JOB_LEASE_MAX = timedelta(days=7)
# Credits carry four decimal places; a job pays at most this much.
CREDITS_PLACES = Decimal("0.0001")
MAX_JOB_CREDITS = Decimal("99999999")

# Columns kept by the job ledger and the karma ledger, each changed only by
# its own UPDATE in the transaction that records the change (see Island.save).
LEDGER_FIELDS = frozenset({"jobs_completed", "jobs_failed", "earnings", "karma"})
# The columns a heartbeat may change; record_heartbeats writes exactly these.
HEARTBEAT_FIELDS = [
    "status",
    "last_heartbeat_at",
    "offline_after",
    "metrics",
    "supported_runtimes",
    "asking_prices",
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
HEARTBEAT_REPLACES = frozenset({"metrics", "supported_runtimes", "asking_prices"})


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
            case Island.LiveStatus.ONLINE:
                return present.exclude(status=Island.Status.SIGNED_OFF).filter(offline_after__gt=now)
            case Island.LiveStatus.OFFLINE:
                return present.exclude(status=Island.Status.SIGNED_OFF).filter(
                    Q(offline_after__isnull=True) | Q(offline_after__lte=now)
                )

    def online(self, now: datetime | None = None) -> "IslandQuerySet":
        """Islands shown as online at `now` (see Island.status_at), e.g. for routing."""
        return self.shown_as(Island.LiveStatus.ONLINE, now or timezone.now())

    def can_run(self, runtime: str) -> "IslandQuerySet":
        """Active Islands able to run cargos built for `runtime`, online or not.

        Routing combines this with online status, e.g. `.can_run("coreml").online()`.
        """
        return self.active().filter(runtime_capability(runtime))

    def holding_token(self, token_hashes: str | Iterable[str], now: datetime) -> "IslandQuerySet":
        """Active Islands whose unexpired API token hashes to one of `token_hashes`."""
        return self.active().filter(_holds_token(token_hashes, now))


_IslandManagerBase = models.Manager.from_queryset(IslandQuerySet)


class IslandManager(_IslandManagerBase["Island"]):
    def linked_host(self, host_id: str) -> "Island | None":
        return self.active().select_related("owner").filter(host_id=host_id).first()

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
        return outcomes

    def _lock_for_heartbeats(
        self, token_hashes: set[str], host_ids: set[str], now: datetime
    ) -> list["Island"]:
        """Lock and read the Islands a heartbeat batch names.

        The row locks make the status read here and the write that follows one
        compare-and-set with respect to the watcher, so a transition is recorded
        by exactly one of them. Locking in pk order keeps two concurrent batches
        from deadlocking; NO KEY leaves inserting jobs for these Islands unblocked.
        Only what a heartbeat reads or may keep is loaded (and the name, which
        save() checks): loading whole rows was most of a large batch's cost.
        Every heartbeat replaces the JSON columns, so they are not read.
        """
        conditions = []
        if token_hashes:
            conditions.append(_holds_token(token_hashes, now))
        if host_ids:
            conditions.append(Q(host_id__in=host_ids))
        islands = self.active().filter(functools.reduce(operator.or_, conditions))
        kept = (name for name in HEARTBEAT_FIELDS if name not in HEARTBEAT_REPLACES)
        return list(
            islands.only("host_id", "name", "token_hash", *kept).select_for_update(no_key=True).order_by("pk")
        )

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
        meta = self.model._meta
        fields: list[models.Field[Any, Any]] = []
        for name in ["id", *HEARTBEAT_FIELDS]:
            field = meta.get_field(name)
            assert isinstance(field, models.Field)
            fields.append(field)
        quote = connection.ops.quote_name
        # Identifiers and types come from the model, never from input; the
        # values travel as parameters, each an array of its column's type.
        names = [quote(field.column or field.attname) for field in fields]
        arrays = ", ".join(f"%b::{field.db_type(connection)}[]" for field in fields)
        assignments = ", ".join(f"{name} = v.{name}" for name in names[1:])
        columns: list[list[Any]] = []
        for field in fields:
            values = [getattr(island, field.attname) for island in islands]
            if isinstance(field, models.JSONField):
                values = [msgspec.json.encode(value).decode() for value in values]
            columns.append(values)
        # A cursor of psycopg's own: Django's binds client-side, quoting every
        # array element in Python. Same connection, same transaction.
        with psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(
                f"UPDATE {quote(meta.db_table)} AS t SET {assignments} "  # noqa: S608
                f"FROM unnest({arrays}) AS v({', '.join(names)}) WHERE t.{names[0]} = v.{names[0]}",
                columns,
            )

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
        for pk, deadline in self.due_offline(now).values_list("pk", "offline_after")[:limit]:
            if deadline is None:  # never: due_offline compares it with now
                continue
            with transaction.atomic():
                won = self.filter(pk=pk, status=Island.Status.ONLINE, offline_after=deadline).update(
                    status=Island.Status.OFFLINE
                )
                if won:
                    changes.append(
                        StatusChange.objects.create(
                            island_id=pk,
                            at=deadline,
                            from_status=Island.Status.ONLINE,
                            to_status=Island.Status.OFFLINE,
                            reason=StatusChange.Reason.SILENCE,
                        )
                    )
        return changes


class Island(models.Model):
    class Kind(models.TextChoices):
        DESKTOP = "desktop", "Desktop or server"
        MOBILE = "mobile", "Mobile"

    class Platform(models.TextChoices):
        IOS = "ios", "iOS"
        ANDROID = "android", "Android"

    class Status(models.TextChoices):
        """The status last recorded, for the watcher's compare-and-set."""

        ONLINE = "online", "Online"
        OFFLINE = "offline", "Offline"
        SIGNED_OFF = "signed_off", "Signed off"

    class LiveStatus(models.TextChoices):
        """What people are shown: derived from the clock when read, never stale."""

        ONLINE = "online", "Online"
        OFFLINE = "offline", "Offline"
        SIGNED_OFF = "signed_off", "Signed off"
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

    # Derived from the job ledger (Job), changed in the same transaction as
    # the job whose terminal state they count.
    jobs_completed = models.PositiveIntegerField(default=0)
    jobs_failed = models.PositiveIntegerField(default=0)
    earnings = models.DecimalField(max_digits=18, decimal_places=4, default=Decimal(0))
    # The running sum of the Island's karma events (karma.KarmaEvent), kept on
    # the row so the cards read it without a join. Only KarmaEvent.objects
    # changes it, in the same transaction as the event it adds.
    karma = models.DecimalField(max_digits=5, decimal_places=2, default=karma_rules.START, editable=False)

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
        """Unlink the Island: its token stops working at once."""
        self.removed_at = now or timezone.now()
        self.token_hash = None
        self.token_expires_at = None
        self.save(update_fields=["removed_at", "token_hash", "token_expires_at"])
        logger.info(
            "event=island_removed island_id=%s host_id=%s owner_id=%s", self.pk, self.host_id, self.owner_id
        )

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
        if self.offline_after is not None and now < self.offline_after:
            return self.LiveStatus.ONLINE
        return self.LiveStatus.OFFLINE

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


def runtime_capability(runtime: str) -> Q:
    """The condition for an Island to run `runtime`; it matches nothing for an unknown one.

    A separate Q so that, once heartbeats carry supported_runtimes, what an
    Island reports can be OR-ed in here without touching the callers.
    """
    runtime = runtime.lower()
    condition = Q(pk__in=[])
    if runtime in DESKTOP_RUNTIMES:
        condition |= Q(kind=Island.Kind.DESKTOP)
    if runtime in MOBILE_RUNTIMES:
        condition |= Q(kind=Island.Kind.MOBILE, runtime=runtime)
    return condition


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


class JobStateConflict(JobError):
    def __init__(self, job_id: str, state: str):
        super().__init__(f"job {job_id} already ended as {state}")
        self.state = state


class DuplicateJob(JobError):
    def __init__(self, existing: "Job"):
        super().__init__(f"job_id {existing.job_id} is already recorded")
        self.existing = existing


class IslandUnavailable(JobError):
    pass


@dataclass(frozen=True)
class StatusReport:
    """The outcome of an Island's status report: applied, or accepted and ignored."""

    applied: bool
    state: "Job.State"


class JobManager(models.Manager["Job"]):
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
        """Record that the dispatcher gave `job_id` to `island`, holding it for `lease`."""
        now = now or timezone.now()
        if island.removed_at is not None:
            raise IslandUnavailable("this Island was removed")
        if island.suspended_at is not None:
            raise IslandUnavailable("this Island is suspended")
        try:
            with transaction.atomic():
                return self.create(
                    job_id=job_id,
                    island=island,
                    workload=workload,
                    credits=credits.quantize(CREDITS_PLACES),
                    assigned_at=now,
                    lease_expires_at=now + lease,
                )
        except IntegrityError:
            existing = self.filter(job_id=job_id).first()
            if existing is None:
                raise
            raise DuplicateJob(existing) from None

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
        job = (
            self.filter(job_id=job_id, island=island)
            .only("pk", "state", "assigned_at", "lease_expires_at")
            .first()
        )
        if job is None:
            raise JobNotFound(f"no job {job_id} for this Island")
        if job.state not in Job.ACTIVE_STATES or job.lease_expires_at <= now:
            return None
        asked = min(timedelta(seconds=max(seconds, 0)), LEASE_RENEWAL_MAX)
        wanted = min(now + asked, job.assigned_at + JOB_LEASE_MAX)
        if wanted <= job.lease_expires_at:
            return job.lease_expires_at
        won = self.filter(
            pk=job.pk, state__in=Job.ACTIVE_STATES, lease_expires_at=job.lease_expires_at
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
        active state decides, by its row count, and the Island's counters
        change in the same transaction. A repeat of the state the job ended in
        is accepted and ignored (JetStream redelivers); a different terminal
        state raises JobStateConflict. Active states only move forward, and
        late or repeated ones are ignored. Times are the coordinator's, not
        the agent's clock, because karma is computed from them.
        """
        now = now or timezone.now()
        target = Job.State(state)
        if target == Job.State.TIMED_OUT or target == Job.State.ASSIGNED:
            raise ValueError(f"an Island cannot report {target}")
        with transaction.atomic():
            job = self.filter(job_id=job_id, island=island).only("pk", "island_id", "credits").first()
            if job is None:
                raise JobNotFound(f"no job {job_id} for this Island")
            if target in Job.TERMINAL_STATES:
                # PostgreSQL stores no NUL; the rest of the text is worth keeping.
                kept = (error or "").replace("\x00", "\ufffd")[:JOB_ERROR_MAX_LENGTH]
                won = self.filter(pk=job.pk, state__in=Job.ACTIVE_STATES).update(
                    state=target, finished_at=now, error=kept
                )
                if won:
                    job.count_on_island(target)
                    job_finished.send(sender=Job, job_pk=job.pk, now=now)
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
            moved = self.filter(pk=job.pk, state__in=earlier).update(
                state=target, started_at=Coalesce(F("started_at"), models.Value(now))
            )
            if moved:
                return StatusReport(applied=True, state=target)
            current = Job.State(self.filter(pk=job.pk).values_list("state", flat=True).get())
            return StatusReport(applied=False, state=current)

    def time_out_expired(self, now: datetime, limit: int = WATCH_BATCH) -> list[str]:
        """Fail as timed out the jobs whose lease passed with no final state. The watcher's step.

        Like the silences: a compare-and-set per job on its state and the
        lease that passed, dated at that deadline, so two watchers (or a late
        report racing one) settle each job once. Returns the job ids.
        """
        timed_out: list[str] = []
        due = (
            self.filter(state__in=Job.ACTIVE_STATES, lease_expires_at__lte=now)
            .order_by("lease_expires_at")
            .values_list("pk", "job_id", "island_id", "lease_expires_at")
        )
        for pk, job_id, island_id, deadline in due[:limit]:
            with transaction.atomic():
                won = self.filter(pk=pk, state__in=Job.ACTIVE_STATES, lease_expires_at=deadline).update(
                    state=Job.State.TIMED_OUT,
                    finished_at=deadline,
                    error="the lease expired before the Island reported a final state",
                )
                if won:
                    Island.objects.filter(pk=island_id).update(jobs_failed=F("jobs_failed") + 1)
                    job_finished.send(sender=Job, job_pk=pk, now=now)
                    timed_out.append(job_id)
        return timed_out


class Job(models.Model):
    """The ledger: one row per job the dispatcher gave an Island.

    The Island's jobs_completed, jobs_failed and earnings are sums over these
    rows, kept as counters so "Your Islands" reads them without aggregating.
    """

    class State(models.TextChoices):
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
    # Islands are never deleted, only removed, so their ledger stays whole.
    island = models.ForeignKey(Island, on_delete=models.CASCADE, related_name="jobs")
    workload = models.CharField(max_length=128)
    credits = models.DecimalField(max_digits=12, decimal_places=4)
    state = models.CharField(max_length=16, choices=State.choices, default=State.ASSIGNED)
    assigned_at = models.DateTimeField(default=timezone.now)
    lease_expires_at = models.DateTimeField()
    # When the Island first said it started (or streamed): karma rewards quick starts.
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

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
        ]
        constraints = [
            models.CheckConstraint(condition=Q(credits__gte=0), name="job_credits_not_negative"),
        ]

    def __str__(self) -> str:
        return self.job_id

    def count_on_island(self, final_state: "Job.State") -> None:
        """Add this job's outcome to its Island's counters, atomically in SQL."""
        if final_state == Job.State.SUCCEEDED:
            updates = {"jobs_completed": F("jobs_completed") + 1, "earnings": F("earnings") + self.credits}
        elif final_state in (Job.State.FAILED, Job.State.TIMED_OUT):
            updates = {"jobs_failed": F("jobs_failed") + 1}
        else:
            return  # a cancelled job neither counts nor pays
        Island.objects.filter(pk=self.island_id).update(**updates)


class DispatcherKeyManager(models.Manager["DispatcherKey"]):
    def issue(self, name: str) -> tuple["DispatcherKey", str]:
        """Create a key and return it with its plaintext, which is never stored."""
        key = DISPATCHER_KEY_PREFIX + generate_secret()
        return self.create(name=name, key_hash=hash_secret(key)), key

    def authenticate(self, key: str) -> "DispatcherKey | None":
        if not key.startswith(DISPATCHER_KEY_PREFIX) or len(key) > 128:
            return None
        return self.filter(key_hash=hash_secret(key), revoked_at__isnull=True).first()


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
