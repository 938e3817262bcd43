import asyncio
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict
from urllib.parse import urlencode

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from islands.mobile import MobileDevice
from islands.models import Island
from pairing.codes import generate_code, generate_secret, hash_code, hash_secret

if TYPE_CHECKING:
    from django.contrib.auth.models import User

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

type CodeState = Literal["live", "used", "retired", "expired"]


class PairingError(Exception):
    """A pairing step that cannot go ahead; the message is safe to show."""


class CodeNotFound(PairingError):
    """Unknown, already used or superseded: one answer, so guessers learn nothing."""


class CodeExpired(PairingError):
    pass


class HostAlreadyLinked(PairingError):
    def __init__(self, island: Island):
        super().__init__("already paired")
        self.island = island


class BadDeviceSecret(PairingError):
    pass


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
        if state == "expired":
            raise CodeExpired("That code has expired.")
        if state != "live":
            raise CodeNotFound("That code is unknown or was already used.")


class Capabilities(TypedDict, total=False):
    gpu_model: str | None
    gpu_vram_mb: int | None
    cpu_cores: int | None
    ram_mb: int | None
    region: str | None


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


class PairingCodeManager(models.Manager["PairingCode"]):
    def get_queryset(self) -> CodeQuerySet["PairingCode"]:
        return CodeQuerySet(self.model, using=self._db)

    def find(self, code: str) -> "PairingCode | None":
        return self.get_queryset().find(code)

    def issue(
        self,
        *,
        host_id: str,
        capabilities: Capabilities | None = None,
        version: str | None = None,
        requested_ip: str | None = None,
        channel: "PairingCode.Channel",
        now: datetime | None = None,
    ) -> IssuedCode:
        """Draw a code for a host that is not linked yet, retiring its earlier codes.

        Codes asked for over NATS get no device secret: the real agent never
        polls, it learns nothing more until it is restarted.
        """
        now = now or timezone.now()
        linked = Island.objects.linked_host(host_id)
        if linked is not None:
            raise HostAlreadyLinked(linked)
        device_secret = generate_secret() if channel == PairingCode.Channel.HTTP else ""
        row = PairingCode(
            host_id=host_id,
            capabilities=dict(capabilities or {}),
            agent_version=(version or "")[:64],
            requested_ip=requested_ip,
            channel=channel,
            device_secret_hash=hash_secret(device_secret) if device_secret else "",
        )
        with transaction.atomic():
            self.get_queryset().unused().filter(host_id=host_id).update(retired_at=now)
            code = self.get_queryset().insert_with_fresh_code(row, now)
        return IssuedCode(row=row, code=code, device_secret=device_secret)

    def take_registration(
        self, host_id: str, capabilities: Capabilities, version: str | None, now: datetime | None = None
    ) -> int:
        """Give the host's live codes the hardware it registered with; return how many.

        Over NATS the agent's register and pairing request travel on two
        subjects, and with several bridges they may be handled in either
        order; a register handled second still reaches the code /pair shows.
        """
        now = now or timezone.now()
        return (
            self.get_queryset()
            .live(now)
            .filter(host_id=host_id)
            .update(capabilities=dict(capabilities), agent_version=(version or "")[:64])
        )

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

    def prune(self, now: datetime, keep: timedelta) -> int:
        return self.get_queryset().prune(now, keep)


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

    def __str__(self) -> str:
        return f"Pairing code for {self.host_id}"

    def redeem(self, user: "User", now: datetime | None = None) -> Island:
        """Link the Island to `user`. Exactly one of any number of racing callers wins.

        The conditional UPDATE decides the winner by its row count; the Island
        is created in the same transaction, so a failed link writes nothing.
        """
        now = now or timezone.now()
        self.check_redeemable(now)
        caps = self.capabilities
        try:
            with transaction.atomic():
                won = (
                    PairingCode.objects.get_queryset()
                    .live(now)
                    .filter(pk=self.pk)
                    .update(used_at=now, used_by=user)
                )
                if not won:
                    raise CodeNotFound("That code is unknown or was already used.")
                island = Island.objects.create(
                    owner=user,
                    host_id=self.host_id,
                    kind=Island.Kind.DESKTOP,
                    gpu_model=(caps.get("gpu_model") or "")[:128],
                    gpu_vram_mb=caps.get("gpu_vram_mb"),
                    cpu_cores=caps.get("cpu_cores"),
                    ram_mb=caps.get("ram_mb"),
                    region=(caps.get("region") or "")[:64],
                    agent_version=self.agent_version,
                    paired_at=now,
                )
                PairingCode.objects.filter(pk=self.pk).update(island=island)
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
PHONE_FIELDS = ["platform", "device_model", "os_version", "runtime", "accelerator", "cpu_cores", "ram_mb"]
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


class MobilePairingSessionManager(models.Manager["MobilePairingSession"]):
    def get_queryset(self) -> CodeQuerySet["MobilePairingSession"]:
        return CodeQuerySet(self.model, using=self._db)

    def owned_by(self, user: "User") -> CodeQuerySet["MobilePairingSession"]:
        return self.get_queryset().filter(owner=user)

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
            earlier = self.get_queryset().unused().filter(owner=owner)
            still_live = list(earlier.filter(expires_at__gt=now))
            earlier.update(retired_at=now)
            code = self.get_queryset().insert_with_fresh_code(row, now)
            for session in still_live:
                session.retired_at = now
                session.announce(now)
        return OpenedSession(row=row, code=code, secret=secret)

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
            session = self.get_queryset().find(code)
            via = MobilePairingSession.Method.CODE
        elif secret is not None:
            session = self.get_queryset().filter(scan_secret_hash=hash_secret(secret)).first()
            via = MobilePairingSession.Method.SECRET
        else:
            raise ValueError("a code or a secret is needed")
        if session is None:
            raise CodeNotFound("That code is unknown or was already used.")
        return session.redeem(host_id=host_id, device=device, via=via, ip=ip, now=now)

    def prune(self, now: datetime, keep: timedelta) -> int:
        return self.get_queryset().prune(now, keep)


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
        return f"pairing.mobile.{self.id.hex}"

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

        The conditional UPDATE decides the one winner among racing callers; the
        Island is created or updated in the same transaction, so a refused
        pairing leaves the session unused and writes nothing.
        """
        now = now or timezone.now()
        self.check_redeemable(now)
        try:
            with transaction.atomic():
                won = (
                    MobilePairingSession.objects.get_queryset()
                    .live(now)
                    .filter(pk=self.pk)
                    .update(used_at=now, redeemed_via=via, redeemed_ip=ip)
                )
                if not won:
                    raise CodeNotFound("That code is unknown or was already used.")
                island = self._link_phone(host_id, device, now)
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

    def _link_phone(self, host_id: str, device: MobileDevice, now: datetime) -> Island:
        """The owner's Island for this phone, created or brought up to date.

        The same phone pairing again to the same account keeps its Island (and
        so its history); only its device fields and token are replaced.
        """
        island = Island.objects.active().select_for_update().filter(host_id=host_id).first()
        if island is not None and island.owner_id != self.owner_id:
            raise HostIdTaken(island, LINKED_ELSEWHERE)
        if island is not None and island.kind != Island.Kind.MOBILE:
            raise HostIdTaken(island, "this host_id belongs to a desktop or server Island, not a phone")
        new = island is None
        if island is None:
            island = Island(owner_id=self.owner_id, host_id=host_id, kind=Island.Kind.MOBILE, paired_at=now)
        island.platform = device.platform
        island.device_model = device.model
        island.os_version = device.os_version or ""
        island.runtime = device.runtime
        island.accelerator = (device.accelerator or "").lower()
        island.cpu_cores = device.cpu_cores
        island.ram_mb = device.ram_mb
        # An existing Island gets only its device fields written, so whatever
        # else is kept on it (name, history, status) is left as it is.
        island.save(update_fields=None if new else PHONE_FIELDS)
        return island
