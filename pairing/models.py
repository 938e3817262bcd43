import asyncio
import logging
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict
from urllib.parse import urlencode

import msgspec
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from archipelag import ratelimit
from archipelag.secrets import generate_secret, hash_secret
from islands.agent import Capabilities, HostRegistration
from islands.mobile import MobileDevice
from islands.models import Island, IslandKey
from pairing import limits, pending
from pairing.codes import generate_code, hash_code

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger("archipelag.pairing")

CODE_TTL = timedelta(minutes=10)
POLL_INTERVAL = timedelta(seconds=5)
# A device that sleeps exactly POLL_INTERVAL between polls arrives a little
# early now and then (timer and network jitter); that is not "too fast".
POLL_JITTER = timedelta(milliseconds=500)
# The live event a pairing sends its page is sent before the phone gets its
# answer, and is best-effort (the page polls too), so a Redis that hangs
# (frozen, swapping, partitioned) may hold up the phone this long at most,
# not the channel layer's 30 s socket timeout: past its own timeout the
# app would report a failure for a pairing that stands.
ANNOUNCE_TIMEOUT = 2.0  # seconds
# Each draw collides with a live code with odds (live codes) / 32**6, so a
# handful of attempts is only ever exhausted by a broken random source.
ISSUE_ATTEMPTS = 8
UNKNOWN_CODE = "That code is unknown or was already used."

type CodeState = Literal["live", "used", "retired", "expired"]


class PairingError(Exception):
    """A pairing step that cannot go ahead; the message is safe to show."""


class CodeNotFound(PairingError):
    """Unknown, already used or superseded: one answer, so guessers learn nothing."""

    def __init__(self, message: str = UNKNOWN_CODE):
        super().__init__(message)


class CodeJustUsed(CodeNotFound):
    """A code redeemed within its lifetime: whoever types it knew it, so it is not a guess.

    Typically another tab or person confirming the same code, who lost the
    race. Shown exactly like an unknown code.
    """


class CodeExpired(PairingError):
    pass


class HostAlreadyLinked(PairingError):
    def __init__(self, island: Island):
        super().__init__("already paired")
        self.island = island


class BadDeviceSecret(PairingError):
    pass


class IssueRefused(PairingError):
    """No code for now: a limit is reached, or its counters are out of reach.

    The message (safe to show, the same over HTTP and NATS) says what to
    wait; `status` is the HTTP answer (429 or 503) and `retry_after` the wait.
    """

    def __init__(self, message: str, status: int, retry_after: int):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class PollTooFast(PairingError):
    pass


class TokenAlreadyCollected(PairingError):
    pass


_ALREADY_HANDED_OUT = (
    "the token for this Island was already handed out; remove the Island in /settings and pair again"
)


class HostIdTaken(PairingError):
    """A phone's host_id belongs to an Island this pairing may not update."""

    def __init__(self, island: Island, message: str):
        super().__init__(message)
        self.island = island


class CodeQuerySet[M: "ExpiringCode"](models.QuerySet[M]):
    def live(self, now: datetime) -> "CodeQuerySet[M]":
        return self.filter(used_at__isnull=True, retired_at__isnull=True, expires_at__gt=now)

    def unused(self) -> "CodeQuerySet[M]":
        return self.filter(used_at__isnull=True, retired_at__isnull=True)

    def find(self, code: str) -> M | None:
        """The newest row for a canonical code, whatever its state."""
        return self.filter(code_hash=hash_code(code)).order_by("-created_at").first()

    def insert_with_fresh_code(self, row: M, now: datetime) -> str:
        """Give `row` a code unique among live codes, save it, and return the code.

        Uniqueness is the database's job (a partial unique index over unused
        codes); an expired code still holds its slot there until it is retired,
        which happens here when a new draw lands on it.
        """
        for _ in range(ISSUE_ATTEMPTS):
            code = generate_code()
            row.code_hash = hash_code(code)
            row.created_at = now
            row.expires_at = now + CODE_TTL
            try:
                with transaction.atomic():
                    self.unused().filter(code_hash=row.code_hash, expires_at__lte=now).update(retired_at=now)
                    row.save(force_insert=True)
            except IntegrityError:
                row.pk = None
                continue
            return code
        raise RuntimeError("could not draw a pairing code unique among live codes")

    def prune(self, now: datetime, keep: timedelta) -> int:
        """Delete codes that stopped mattering `keep` ago. Returns how many."""
        deleted, _ = self.filter(expires_at__lt=now - keep).delete()
        return deleted


class ExpiringCode(models.Model):
    """A short code valid for CODE_TTL and redeemable once.

    Every lookup checks expiry against the clock, so an expired code is dead
    whether or not the prune command has run.
    """

    code_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    # Serves the prune command's range delete.
    expires_at = models.DateTimeField(db_index=True)
    used_at = models.DateTimeField(null=True, blank=True)
    # Set when a newer code replaces this one before it was used.
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True
        constraints = [
            # "Unique among live codes", and the index every lookup by code uses.
            models.UniqueConstraint(
                fields=["code_hash"],
                condition=Q(used_at__isnull=True, retired_at__isnull=True),
                name="%(app_label)s_%(class)s_unused_code",
            ),
        ]

    def state(self, now: datetime) -> CodeState:
        if self.used_at is not None:
            return "used"
        if self.retired_at is not None:
            return "retired"
        if self.expires_at <= now:
            return "expired"
        return "live"

    def expires_in_seconds(self, now: datetime) -> int:
        return max(0, math.ceil((self.expires_at - now).total_seconds()))

    def check_redeemable(self, now: datetime) -> None:
        state = self.state(now)
        if state == "used" and self.used_at is not None and now - self.used_at < CODE_TTL:
            raise CodeJustUsed()
        if state == "expired":
            raise CodeExpired("That code has expired.")
        if state != "live":
            raise CodeNotFound()

    def _claim(self, now: datetime, **fields: Any) -> None:
        """Mark this code used, with `fields`, if it is still live; raise if not.

        One conditional UPDATE whose row count decides the winner among any
        number of racing callers: only a live code is updated. Call it in the
        transaction that does what the code was for, so a redemption that
        fails afterwards leaves the code unused.
        """
        rows = type(self)._default_manager.filter(pk=self.pk)
        live = rows.filter(used_at__isnull=True, retired_at__isnull=True)
        if not live.filter(expires_at__gt=now).update(used_at=now, **fields):
            if self.expires_at <= now:
                raise CodeExpired("That code has expired.")
            # Used since it was looked up: a racing caller who knew it too won.
            raise CodeJustUsed() if rows.filter(used_at__isnull=False).exists() else CodeNotFound()


def pair_url() -> str:
    """Where a person types a desktop code; the Island shows it with the code."""
    return settings.PUBLIC_URL + reverse("pairing:pair")


def _merged(registered: HostRegistration | None, requested: Capabilities) -> Capabilities:
    """The hardware a host asked for a code with, over what it registered with: the request wins."""
    if registered is None or registered.capabilities is None:
        return requested
    return msgspec.convert(
        {**msgspec.to_builtins(registered.capabilities), **msgspec.to_builtins(requested)}, Capabilities
    )


class PollAnswer(TypedDict, total=False):
    status: Literal["pending", "paired", "expired"]
    expires_in_seconds: int
    island_id: str
    token: str


@dataclass(frozen=True)
class IssuedCode:
    row: "PairingCode"
    code: str
    device_secret: str

    @property
    def pair_url(self) -> str:
        return pair_url()


_CodeManagerBase = models.Manager.from_queryset(CodeQuerySet)


class PairingCodeManager(_CodeManagerBase["PairingCode"]):
    def request(
        self,
        registration: HostRegistration,
        *,
        channel: "PairingCode.Channel",
        ip: str | None = None,
        now: datetime | None = None,
    ) -> IssuedCode:
        """A host asks for a code, over HTTP or NATS: the one way a code is issued.

        In this order: a host that is already linked hears so before any
        limit is counted (the agent stops asking once told "already paired");
        then the channel's limits (per address over HTTP; per host over
        NATS, which gives no address; see pairing/limits.py), counted
        whether or not a code follows; then, over NATS, the hardware the
        host registered with is merged in; then the code is drawn (over
        NATS, the oldest unused codes past NATS_PENDING_CODES_MAX make
        room). Raises HostAlreadyLinked or IssueRefused.
        """
        now = now or timezone.now()
        host_id = registration.host_id
        # A host minted with an Island key is its owner's already: the agent
        # hears "already paired", so no code exists to intercept or guess.
        linked = IslandKey.objects.link_host(host_id, registration.capabilities, registration.version, now)
        linked = linked or Island.objects.linked_host(host_id)
        if linked is not None:
            raise HostAlreadyLinked(linked)
        by_http = channel == PairingCode.Channel.HTTP
        buckets = limits.issue_buckets(ip=ip or "") if by_http else limits.nats_issue_buckets(host_id=host_id)
        try:
            ratelimit.attempt(buckets, now)
        except ratelimit.RateLimited as exc:
            logger.warning(
                "event=rate_limited action=issue_code channel=%s host_id=%s ip=%s limit=%s",
                channel,
                host_id,
                ip,
                exc.limit.name,
            )
            raise IssueRefused(
                f"too many pairing requests from {exc.limit.per}; retry in {exc.wait_words}",
                429,
                exc.retry_after,
            ) from None
        except ratelimit.Unavailable as exc:
            # Closed: every code issued uncounted would be one more live code to guess.
            raise IssueRefused(
                f"pairing is unavailable for a moment; retry in {exc.wait_words}", 503, exc.retry_after
            ) from None
        capabilities = registration.capabilities or Capabilities()
        registered = None if by_http else self._registration(host_id)
        issued = self._issue(
            host_id=host_id,
            capabilities=_merged(registered, capabilities),
            version=registration.version or (registered.version if registered else None),
            ip=ip,
            channel=channel,
            replaces=registration.device_secret,
            now=now,
        )
        if not by_http and registered is None:
            # The registration may have been handled (by another bridge, or
            # another thread of this one) between the read above and the
            # code's insert, too late to find the code. Once the code is
            # committed, whichever comes second sees the other.
            registered = self._registration(host_id)
            if registered is not None:
                PairingCode.objects.filter(pk=issued.row.pk).update(
                    capabilities=msgspec.to_builtins(_merged(registered, capabilities)),
                    agent_version=registration.version or registered.version or "",
                )
        logger.info("event=code_issued channel=%s host_id=%s ip=%s", channel, host_id, ip)
        return issued

    def register(self, registration: HostRegistration, now: datetime | None = None) -> bool:
        """A host's RegisterHost; True if it went to a linked Island.

        A linked Island takes the hardware at once. For a host not linked yet
        it is kept for the code the host is about to ask for: in the shared
        cache (pairing/pending.py: Redis in production, so every bridge sees
        it, and bounded) and on any live code it already has, for when the
        pairing request was handled first.
        """
        now = now or timezone.now()
        capabilities = registration.capabilities or Capabilities()
        if IslandKey.objects.link_host(registration.host_id, capabilities, registration.version, now):
            # Created with this hardware if new; never rewritten by a
            # registration, which any Island could forge (see link_host).
            return True
        if Island.objects.register_host(registration.host_id, capabilities, registration.version):
            return True
        dropped = pending.keep(registration)
        if dropped:
            logger.warning("event=pending_registrations_dropped count=%d", dropped)
        self.live(now).filter(host_id=registration.host_id).update(
            capabilities=msgspec.to_builtins(capabilities), agent_version=registration.version or ""
        )
        return False

    def _registration(self, host_id: str) -> HostRegistration | None:
        """What the host registered with over NATS lately, if it is not linked."""
        return pending.find(host_id)

    def _issue(
        self,
        *,
        host_id: str,
        capabilities: Capabilities,
        version: str | None,
        ip: str | None,
        channel: "PairingCode.Channel",
        replaces: str | None,
        now: datetime,
    ) -> IssuedCode:
        """Draw a code for a host, retiring the earlier code whose device secret is `replaces`.

        Nothing else is retired: anyone may ask for a code for any host id,
        so a request that does not prove it comes from the same device (by
        its earlier device secret) must not void a code another requester
        holds, or a stranger who knows the host id could make the owner's
        code fail and race to link the host to their own account. Live codes
        for one host coexist until one is redeemed, which retires the rest.

        Codes asked for over NATS get no device secret: the real agent never
        polls, it learns nothing more until it is restarted.
        """
        device_secret = generate_secret() if channel == PairingCode.Channel.HTTP else ""
        row = PairingCode(
            host_id=host_id,
            capabilities=msgspec.to_builtins(capabilities),
            agent_version=version or "",
            requested_ip=ip,
            channel=channel,
            device_secret_hash=hash_secret(device_secret) if device_secret else "",
        )
        with transaction.atomic():
            if replaces:
                earlier = self.unused().filter(host_id=host_id, device_secret_hash=hash_secret(replaces))
                earlier.exclude(device_secret_hash="").update(retired_at=now)
            code = self.insert_with_fresh_code(row, now)
        if channel == PairingCode.Channel.NATS:
            self.make_room_over_nats()
        return IssuedCode(row=row, code=code, device_secret=device_secret)

    def make_room_over_nats(self) -> int:
        """Delete the oldest unused NATS codes past NATS_PENDING_CODES_MAX; returns how many.

        Anyone on NATS can ask codes for made-up hosts, and a service-wide
        budget for them would shut pairing for every honest agent (issue 13),
        so what they can take is bounded by count instead: the newest
        stay, so an honest agent that has just asked keeps its code. Unused
        codes include expired and retired ones, which matter to nobody.
        SKIP LOCKED: two bridges making room at once each delete what the
        other has not taken, never waiting on (or deadlocking with) it.
        """
        most = max(1, settings.NATS_PENDING_CODES_MAX)
        with transaction.atomic():
            oldest = (
                self.filter(channel=PairingCode.Channel.NATS, used_at__isnull=True)
                .order_by("-created_at", "-pk")
                .select_for_update(skip_locked=True)
                .values("pk")[most:]
            )
            deleted, _ = self.filter(pk__in=models.Subquery(oldest)).delete()
        if deleted:
            logger.warning("event=pending_codes_dropped count=%d", deleted)
        return deleted

    def lookup(self, code: str, now: datetime | None = None) -> "PairingCode":
        """The live code a person typed, for a host not linked yet; raises PairingError."""
        now = now or timezone.now()
        row = self.find(code)
        if row is None:
            raise CodeNotFound()
        row.check_redeemable(now)
        linked = Island.objects.linked_host(row.host_id)
        if linked is not None:
            raise HostAlreadyLinked(linked)
        return row

    def poll(self, host_id: str, device_secret: str, now: datetime | None = None) -> PollAnswer:
        """What a device polling with its secret learns; the token is handed out once."""
        now = now or timezone.now()
        row = (
            self.filter(host_id=host_id, device_secret_hash=hash_secret(device_secret))
            .exclude(device_secret_hash="")
            .select_related("island")
            .first()
        )
        if row is None:
            raise BadDeviceSecret("unknown host_id or wrong device_secret")
        island = row.island
        paired = row.used_at is not None and island is not None and island.removed_at is None
        if paired and row.token_issued_at is not None:
            # Refused before the poll is recorded: a refused request writes
            # nothing (docs/api.md), and this answer can never change.
            raise TokenAlreadyCollected(_ALREADY_HANDED_OUT)
        # Compare-and-set on the last poll time: two polls racing each other
        # cannot both pass, and a device polling too fast is told to slow down.
        allowed = self.filter(pk=row.pk).filter(
            Q(last_polled_at__isnull=True) | Q(last_polled_at__lte=now - POLL_INTERVAL + POLL_JITTER)
        )
        if not allowed.update(last_polled_at=now):
            raise PollTooFast("slow_down")

        if paired and island is not None:
            with transaction.atomic():
                # The check above read the row before the poll was recorded;
                # this conditional UPDATE is what hands the token out once.
                if not self.filter(pk=row.pk, token_issued_at__isnull=True).update(token_issued_at=now):
                    raise TokenAlreadyCollected(_ALREADY_HANDED_OUT)
                token = island.issue_token(now)
            return {"status": "paired", "island_id": str(island.pk), "token": token}
        if row.state(now) != "live":
            return {"status": "expired"}
        return {"status": "pending", "expires_in_seconds": row.expires_in_seconds(now)}


class PairingCode(ExpiringCode):
    """A code an Island asked for, to be typed by a signed-in user at /pair."""

    class Channel(models.TextChoices):
        HTTP = "http", "HTTP API"
        NATS = "nats", "NATS"

    # Serves retiring a host's earlier codes and the device's polls.
    host_id = models.CharField(max_length=64, db_index=True)
    capabilities = models.JSONField(default=dict, blank=True)
    agent_version = models.CharField(max_length=64, blank=True)
    requested_ip = models.GenericIPAddressField(null=True, blank=True)
    channel = models.CharField(max_length=8, choices=Channel.choices, default=Channel.HTTP)
    device_secret_hash = models.CharField(max_length=64, blank=True, editable=False)
    used_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    island = models.ForeignKey(Island, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    last_polled_at = models.DateTimeField(null=True, blank=True)
    token_issued_at = models.DateTimeField(null=True, blank=True)

    objects = PairingCodeManager()

    class Meta(ExpiringCode.Meta):
        ordering = ["-created_at"]
        indexes = [
            # Serves make_room_over_nats: the newest unused NATS codes first.
            models.Index(
                fields=["-created_at", "-id"],
                condition=Q(channel="nats", used_at__isnull=True),
                name="pairing_nats_unused_newest",
            ),
        ]

    def __str__(self) -> str:
        return f"Pairing code for {self.host_id}"

    def redeem(self, user: "User", now: datetime | None = None) -> Island:
        """Link the Island to `user`. Exactly one of any number of racing callers wins.

        The claim (a conditional UPDATE) decides the winner by its row count;
        the Island is created in the same transaction, so a failed link writes
        nothing.
        """
        now = now or timezone.now()
        island = Island(
            owner=user,
            host_id=self.host_id,
            kind=Island.Kind.DESKTOP,
            # The agent asks over NATS and takes its jobs there; the simulator, over HTTP.
            transport=Island.Transport.NATS if self.channel == self.Channel.NATS else Island.Transport.HTTP,
            agent_version=self.agent_version,
            paired_at=now,
        )
        island.take_capabilities(msgspec.convert(self.capabilities, Capabilities))
        try:
            with transaction.atomic():
                self._claim(now, used_by=user)
                # The address the Island asked for its code from (HTTP), if known.
                island = Island.objects.link(island, address=self.requested_ip)
                PairingCode.objects.filter(pk=self.pk).update(island=island)
                # The host's other live codes (other requesters', its own
                # earlier ones over NATS) can link nothing now: their polls
                # say "expired", and the host's next request "already paired".
                others = PairingCode.objects.unused().filter(host_id=self.host_id).exclude(pk=self.pk)
                others.update(retired_at=now)
        except IntegrityError:
            # Another account linked this host between lookup and confirm.
            linked = Island.objects.linked_host(self.host_id)
            if linked is None:
                raise
            raise HostAlreadyLinked(linked) from None
        self.used_at, self.used_by, self.island = now, user, island
        return island


# --- Mobile pairing ------------------------------------------------------------
#
# Pairing runs the other way round for phones: the signed-in page opens a
# session (code + scan secret, shown as a QR code), the app redeems it, and
# the page hears about it over a websocket.

type SessionState = Literal["waiting", "paired", "expired"]

LINKED_ELSEWHERE = "this phone is linked to another account; remove it there before pairing it with this one"
# What pairing a phone sets on its Island, and all it changes on a known one.
PHONE_FIELDS = [
    "platform",
    "device_model",
    "os_version",
    "runtime",
    "runtimes",
    "accelerator",
    "cpu_cores",
    "ram_mb",
]
# How the page names a phone's runtime: "Paired: iPhone 15 Pro (CoreML / ANE)".
RUNTIME_LABELS = {"coreml": "CoreML", "onnx": "ONNX"}


class PairedPhone(TypedDict):
    id: str
    name: str
    label: str
    platform: str
    model: str
    os_version: str
    runtime: str
    accelerator: str
    removed: bool
    remove_url: str


class SessionSnapshot(TypedDict):
    """What a page watching a session is told, over the websocket or the status URL."""

    state: SessionState
    session_id: str
    expires_in_seconds: NotRequired[int]  # waiting
    island: NotRequired[PairedPhone]  # paired
    reason: NotRequired[Literal["expired", "replaced", "used"]]  # expired


def phone_label(island: Island) -> str:
    runtime = RUNTIME_LABELS.get(island.runtime, island.runtime)
    accelerator = island.accelerator.upper()
    return (
        f"{island.device_model} ({runtime} / {accelerator})"
        if accelerator
        else f"{island.device_model} ({runtime})"
    )


def mask_name(name: str) -> str:
    """'alice' -> 'a***e': enough for the phone's owner to recognise, little for a guesser."""
    if len(name) <= 2:
        return f"{name[:1]}***"
    return f"{name[0]}***{name[-1]}"


def send_to_group(group: str, message: dict[str, Any]) -> None:
    """Send to a group, giving up after ANNOUNCE_TIMEOUT (raising TimeoutError)."""

    async def send() -> None:
        await asyncio.wait_for(get_channel_layer().group_send(group, message), ANNOUNCE_TIMEOUT)

    async_to_sync(send)()


@dataclass(frozen=True)
class OpenedSession:
    row: "MobilePairingSession"
    code: str
    secret: str

    @property
    def scan_url(self) -> str:
        """The QR code's payload. The secret rides in the fragment, which browsers
        never send to a server, so it cannot end up in an access log even when a
        phone's ordinary camera app opens the link."""
        fragment = urlencode({"code": self.code, "secret": self.secret})
        return f"{settings.PUBLIC_URL}{reverse('pairing:mobile-scan')}#{fragment}"


@dataclass(frozen=True)
class MobilePairing:
    session: "MobilePairingSession"
    island: Island
    token: str


class MobilePairingSessionManager(_CodeManagerBase["MobilePairingSession"]):
    def owned_by(self, user: "User") -> CodeQuerySet["MobilePairingSession"]:
        return self.filter(owner=user)

    def open(self, owner: "User", now: datetime | None = None) -> OpenedSession:
        """Open a session for `owner`, retiring their earlier unused ones.

        Only the newest session of an account works, as only the newest code of
        a desktop host does: it keeps the number of live codes (and so the odds
        of guessing one) bounded by the number of people pairing. Pages still
        showing a retired session are told so after the commit.
        """
        now = now or timezone.now()
        secret = generate_secret()
        row = MobilePairingSession(owner=owner, scan_secret_hash=hash_secret(secret))
        with transaction.atomic():
            earlier = self.unused().filter(owner=owner)
            still_live = list(earlier.filter(expires_at__gt=now))
            earlier.update(retired_at=now)
            code = self.insert_with_fresh_code(row, now)
            for session in still_live:
                session.retired_at = now
                session.announce(now)
        return OpenedSession(row=row, code=code, secret=secret)

    def end_for(self, owner: "User", now: datetime | None = None) -> int:
        """Retire `owner`'s sessions not yet used: signing out ends them. Returns how many were live.

        A code shown on /pair/mobile lets whoever types it add a phone to the
        account, so it must not outlive the signed-in session that showed
        it. Pages still showing one are told after the commit.
        """
        now = now or timezone.now()
        with transaction.atomic():
            unused = self.unused().filter(owner=owner)
            live = list(unused.filter(expires_at__gt=now))
            unused.update(retired_at=now)
            for session in live:
                session.retired_at = now
                session.announce(now)
        return len(live)

    def redeem(
        self,
        *,
        code: str | None = None,
        secret: str | None = None,
        host_id: str,
        device: MobileDevice,
        ip: str | None = None,
        now: datetime | None = None,
    ) -> MobilePairing:
        """Redeem the session a phone names by its canonical code or its scan secret."""
        now = now or timezone.now()
        if code is not None:
            session = self.find(code)
            via = MobilePairingSession.Method.CODE
        elif secret is not None:
            session = self.filter(scan_secret_hash=hash_secret(secret)).first()
            via = MobilePairingSession.Method.SECRET
        else:
            raise ValueError("a code or a secret is needed")
        if session is None:
            raise CodeNotFound()
        session.check_redeemable(now)
        return session.redeem(host_id=host_id, device=device, via=via, ip=ip, now=now)


class MobilePairingSession(ExpiringCode):
    """A code and scan secret shown at /pair/mobile, for the owner's phone to redeem."""

    class Method(models.TextChoices):
        CODE = "code", "Typed code"
        SECRET = "secret", "Scanned QR code"

    # Public: it names the session in the websocket and status URLs, both of
    # which only its owner may use. Random, so it says nothing about others.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Its index serves retiring an owner's earlier sessions.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    # SHA-256 of the 256-bit secret in the QR code; unique, which is also the
    # index a redemption by secret uses.
    scan_secret_hash = models.CharField(max_length=64, unique=True, editable=False)
    island = models.ForeignKey(Island, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    redeemed_via = models.CharField(max_length=8, choices=Method.choices, blank=True)
    redeemed_ip = models.GenericIPAddressField(null=True, blank=True)

    objects = MobilePairingSessionManager()

    class Meta(ExpiringCode.Meta):
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Mobile pairing session {self.id}"

    @property
    def group_name(self) -> str:
        """The Channels group of the pages watching this session; named here only."""
        return self.group_for(self.id)

    @staticmethod
    def group_for(session_id: uuid.UUID) -> str:
        """The group of session `session_id`, for a socket that joins before reading the row."""
        return f"pairing.mobile.{session_id.hex}"

    def snapshot(self, now: datetime | None = None) -> SessionSnapshot:
        """This session as its page shows it. Reads `island`: select_related it."""
        now = now or timezone.now()
        state = self.state(now)
        session_id = str(self.id)
        if state == "live":
            return {
                "state": "waiting",
                "session_id": session_id,
                "expires_in_seconds": self.expires_in_seconds(now),
            }
        if state == "used" and self.island is not None:
            island = self.island
            return {
                "state": "paired",
                "session_id": session_id,
                "island": {
                    "id": str(island.pk),
                    "name": island.name,
                    "label": phone_label(island),
                    "platform": island.platform,
                    "model": island.device_model,
                    "os_version": island.os_version,
                    "runtime": island.runtime,
                    "accelerator": island.accelerator,
                    "removed": island.removed_at is not None,
                    "remove_url": reverse("islands:remove", args=[island.pk]),
                },
            }
        reason: Literal["expired", "replaced", "used"] = (
            "replaced" if state == "retired" else "used" if state == "used" else "expired"
        )
        return {"state": "expired", "session_id": session_id, "reason": reason}

    def announce(self, now: datetime | None = None) -> None:
        """Send this session's snapshot to the pages watching it, once the
        transaction commits: a page told "paired" must find it in the database.

        Robust: if the channel layer is down the pairing still stands, and the
        page learns of it by polling.
        """
        message = {"type": "pairing.snapshot", "snapshot": self.snapshot(now)}
        group = self.group_name
        transaction.on_commit(lambda: send_to_group(group, message), robust=True)

    def redeem(
        self,
        *,
        host_id: str,
        device: MobileDevice,
        via: "MobilePairingSession.Method",
        ip: str | None = None,
        now: datetime | None = None,
    ) -> MobilePairing:
        """Link the phone to the session's owner and issue its 30-day token.

        The claim (a conditional UPDATE) decides the one winner among racing
        callers; the Island is created or updated in the same transaction, so
        a refused pairing leaves the session unused and writes nothing.
        """
        now = now or timezone.now()
        try:
            with transaction.atomic():
                self._claim(now, redeemed_via=via, redeemed_ip=ip)
                island = self._link_phone(host_id, device, now, ip)
                token = island.issue_token(now)
                MobilePairingSession.objects.filter(pk=self.pk).update(island=island)
                self.used_at, self.redeemed_via, self.redeemed_ip, self.island = now, via, ip, island
                self.announce(now)
        except IntegrityError:
            # Another account linked this host between our lookup and insert.
            linked = Island.objects.linked_host(host_id)
            if linked is None:
                raise
            raise HostIdTaken(linked, LINKED_ELSEWHERE) from None
        return MobilePairing(session=self, island=island, token=token)

    def _link_phone(self, host_id: str, device: MobileDevice, now: datetime, address: str | None) -> Island:
        """The owner's Island for this phone, created or brought up to date.

        The same phone pairing again to the same account keeps its Island (and
        so its history); only its device fields and token are replaced.
        """
        island = Island.objects.active().select_for_update().filter(host_id=host_id).first()
        if island is not None and island.owner_id != self.owner_id:
            raise HostIdTaken(island, LINKED_ELSEWHERE)
        if island is not None and island.kind != Island.Kind.MOBILE:
            raise HostIdTaken(island, "this host_id belongs to a desktop or server Island, not a phone")
        if island is None:
            # A new Island, or the one this account removed for this phone (its karma and history).
            fresh = Island(owner_id=self.owner_id, host_id=host_id, kind=Island.Kind.MOBILE, paired_at=now)
            fresh.platform = device.platform
            fresh.take_capabilities(device.capabilities())
            return Island.objects.link(fresh, address=address)
        island.platform = device.platform
        island.take_capabilities(device.capabilities())
        # An existing Island gets only its device fields written, so whatever
        # else is kept on it (name, history, status) is left as it is.
        island.save(update_fields=PHONE_FIELDS)
        return island
