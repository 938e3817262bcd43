import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import User
from django.core import signing
from django.db import IntegrityError, models, transaction
from django.db.models.functions import Lower
from django.utils import timezone

CONFIRM_SALT = "notify.email.confirm"


def _message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


class EmailAddressManager(models.Manager["EmailAddress"]):
    def confirmed_elsewhere(self, email: str, user: User | None = None) -> bool:
        """Whether another account has confirmed this address (case-insensitively).

        Only confirmed addresses count: typing someone's address reserves nothing.
        """
        taken = self.filter(email__iexact=email, confirmed_at__isnull=False)
        if user is not None and user.pk is not None:
            taken = taken.exclude(user=user)
        return taken.exists()

    def add(self, user: User, email: str, now: datetime) -> "EmailAddress":
        """Record a pending address; the confirmed one, if any, stays until this one is confirmed."""
        existing = self.filter(user=user, email__iexact=email).first()
        if existing is not None:
            return existing
        # One pending address at a time: a new one replaces the last typed one.
        self.filter(user=user, confirmed_at__isnull=True).delete()
        return self.create(user=user, email=email, created_at=now)

    def confirm_token(self, token: str, now: datetime) -> tuple["EmailAddress | None", str]:
        """Confirm the address a link names. Returns the address and what happened.

        Outcomes: "confirmed", "already", "taken" (another account confirmed
        it first), "invalid" (forged, expired, or the address was replaced).
        """
        max_age = timedelta(days=settings.EMAIL_CONFIRMATION_DAYS)
        try:
            payload = signing.loads(token, salt=CONFIRM_SALT, max_age=max_age)
            user_pk, email = int(payload["u"]), str(payload["e"])
        except (signing.BadSignature, KeyError, TypeError, ValueError):
            return None, "invalid"
        address = self.filter(user_id=user_pk, email__iexact=email).select_related("user").first()
        if address is None:
            return None, "invalid"
        if address.confirmed_at is not None:
            return address, "already"
        try:
            with transaction.atomic():
                # Conditional: two clicks of the same link confirm once.
                won = self.filter(pk=address.pk, confirmed_at__isnull=True).update(confirmed_at=now)
                if won:
                    # The newly confirmed address replaces the account's old one.
                    self.filter(user_id=user_pk).exclude(pk=address.pk).delete()
                    User.objects.filter(pk=user_pk).update(email=address.email)
        except IntegrityError:
            # The partial unique index: another account confirmed it first.
            return address, "taken"
        address.refresh_from_db()
        return address, "confirmed" if won else "already"


class EmailAddress(models.Model):
    """An account's email address: pending until its link is opened, then confirmed.

    The confirmed address is mirrored in User.email, which is what Django's
    password reset looks up, so a reset only ever goes to a confirmed address.
    """

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="email_addresses")
    email = models.EmailField(max_length=254)
    created_at = models.DateTimeField(default=timezone.now)
    confirmed_at = models.DateTimeField(null=True, blank=True)

    objects = EmailAddressManager()

    class Meta:
        verbose_name_plural = "email addresses"
        constraints = [
            # Unique among confirmed addresses, whatever the case: nobody
            # can squat an address by typing it, and two accounts racing to
            # confirm the same one cannot both win.
            models.UniqueConstraint(
                Lower("email"),
                condition=models.Q(confirmed_at__isnull=False),
                name="notify_email_confirmed_unique",
            ),
        ]
        indexes = [
            # confirmed_elsewhere() and the signup form's uniqueness check.
            models.Index(Lower("email"), name="notify_email_lower_idx"),
        ]

    def __str__(self) -> str:
        return self.email

    @property
    def confirmed(self) -> bool:
        return self.confirmed_at is not None

    def confirmation_token(self) -> str:
        return signing.dumps({"u": self.user_id, "e": self.email.lower()}, salt=CONFIRM_SALT)


# The sender claims a delivery for this long; a sender killed mid-send
# leaves it claimed, and another sender takes it over once the lease ends
# (the same message id: email is at least once, webhooks de-duplicate).
CLAIM_LEASE = timedelta(seconds=settings.NOTIFY_CLAIM_LEASE)
# Retries after a failure: 1, 2, 4, ... minutes, about an hour in all, then given up.
RETRY_BASE = timedelta(minutes=1)
MAX_ATTEMPTS = 7
SEND_BATCH = 50

# Which switch of Preferences each kind answers to (any one on lets it through).
KIND_SWITCHES = {
    "island.offline": ("offline",),
    "island.online": ("online",),
    "island.flapping": ("offline", "online"),
    "island.linked": ("linked",),
    "island.karma_level": ("karma_level",),
}
KIND_SWITCH_FIELDS = ("offline", "online", "linked", "karma_level")


# The grace an owner may choose before an offline alert, in minutes.
GRACE_MAX_MINUTES = 60


class PreferencesManager(models.Manager["Preferences"]):
    def of(self, user: User) -> "Preferences":
        """The account's choices; the defaults (unsaved) for an account that made none."""
        found = self.filter(user=user).first()
        return found if found is not None else Preferences(user=user)


class Preferences(models.Model):
    """What an account wants to be told (/settings/notifications). No row means the defaults."""

    user = models.OneToOneField(User, on_delete=models.CASCADE, related_name="notify_preferences")
    # Minutes of silence before an offline alert; None means NOTIFY_OFFLINE_GRACE.
    offline_grace_minutes = models.PositiveSmallIntegerField(null=True, blank=True)
    offline = models.BooleanField("Island offline", default=True)
    online = models.BooleanField("Island back online", default=True)
    linked = models.BooleanField("New Island linked", default=True)
    karma_level = models.BooleanField("Karma level changed", default=True)
    # Island ids (strings) whose alerts this account does not want.
    muted_islands = models.JSONField(default=list, blank=True)

    objects = PreferencesManager()

    class Meta:
        verbose_name_plural = "preferences"

    def __str__(self) -> str:
        return f"Notification preferences of {self.user_id}"

    @property
    def offline_grace(self) -> timedelta:
        if self.offline_grace_minutes is None:
            return timedelta(seconds=settings.NOTIFY_OFFLINE_GRACE)
        return timedelta(minutes=self.offline_grace_minutes)

    def wants(self, kind: str, island_id: object = None) -> bool:
        """Whether a notification of this kind (about this Island) should be emailed to this account."""
        switch = KIND_SWITCHES.get(kind)
        if switch is None:
            # Test events and notices about the account itself always go.
            return True
        return any(getattr(self, name) for name in switch)

    def is_muted(self, island_id: object) -> bool:
        return str(island_id) in self.muted_islands


# The events an endpoint may choose.
WEBHOOK_EVENTS = (
    ("island.offline", "An Island went offline"),
    ("island.online", "An Island is back online"),
    ("island.linked", "A new Island was linked"),
    ("island.karma_level", "An Island's karma level changed"),
)
# The endpoints an account may have.
WEBHOOKS_PER_ACCOUNT = 10


class WebhookEndpointManager(models.Manager["WebhookEndpoint"]):
    def add(self, user: User, url: str, events: list[str], now: datetime) -> tuple["WebhookEndpoint", str]:
        """A new endpoint and its signing secret, returned this once (only its encryption is kept)."""
        from notify import webhooks

        secret = webhooks.new_secret()
        endpoint = self.create(
            user=user,
            url=url,
            events=sorted(set(events)),
            secret_encrypted=webhooks.encrypt_secret(secret),
            created_at=now,
        )
        return endpoint, secret


class WebhookEndpoint(models.Model):
    """A URL an account's events are POSTed to, signed with the endpoint's own secret."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="webhook_endpoints")
    url = models.URLField("URL", max_length=2000)
    events = models.JSONField(default=list)
    # The whsec_ secret, encrypted (notify.webhooks): signing needs it back.
    secret_encrypted = models.TextField(editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    # Set when deliveries kept failing for about an hour; nothing is sent until resumed.
    paused_at = models.DateTimeField(null=True, blank=True)
    paused_reason = models.CharField(max_length=500, blank=True)

    objects = WebhookEndpointManager()

    class Meta:
        ordering = ["created_at", "pk"]

    def __str__(self) -> str:
        return self.url

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    def secret(self) -> str:
        from notify import webhooks

        return webhooks.decrypt_secret(self.secret_encrypted)

    def pause(self, now: datetime, reason: str) -> bool:
        """Pause it once (of two failing deliveries, one pauses it and emails the owner)."""
        with transaction.atomic():
            won = WebhookEndpoint.objects.filter(pk=self.pk, paused_at__isnull=True).update(
                paused_at=now, paused_reason=reason[:500]
            )
            if won:
                Notification.objects.record(
                    self.user,
                    Notification.Kind.WEBHOOK_PAUSED,
                    f"webhook_paused:{self.pk}:{now:%Y%m%d%H%M%S%f}",
                    {"url": self.url, "error": reason[:300]},
                    now,
                )
        return bool(won)

    def resume(self) -> None:
        WebhookEndpoint.objects.filter(pk=self.pk).update(paused_at=None, paused_reason="")

    def recent_deliveries(self, count: int = 10) -> "models.QuerySet[Delivery]":
        return self.deliveries.select_related("notification").order_by("-pk")[:count]


class NotificationManager(models.Manager["Notification"]):
    def record(
        self,
        user: User,
        kind: str,
        key: str,
        data: dict[str, object],
        now: datetime,
        island_id: uuid.UUID | str | None = None,
        *,
        send_at: datetime | None = None,
        status_change_id: int | None = None,
    ) -> "Notification | None":
        """Write a notification and its deliveries once per `key`, in the caller's transaction.

        Returns None when one with this key exists already (another watcher
        recorded it): the unique key makes recording idempotent, so two
        processes deriving the same event write it once. Deliveries go to
        the destinations that want this kind about this Island (the account's
        switches and mutes), due at `send_at` (now unless told).
        """
        preferences = Preferences.objects.of(user)
        with transaction.atomic():
            try:
                # A savepoint: a duplicate key fails this insert only, not the caller's transaction.
                with transaction.atomic():
                    notification = self.create(
                        user=user,
                        kind=kind,
                        key=key,
                        data=data,
                        created_at=now,
                        island_id=island_id,
                        status_change_id=status_change_id,
                    )
            except IntegrityError:
                return None
            if island_id is not None and preferences.is_muted(island_id):
                return notification
            due = send_at or now
            for endpoint in WebhookEndpoint.objects.filter(user=user, paused_at__isnull=True):
                if kind in endpoint.events:
                    Delivery.objects.create(
                        notification=notification,
                        channel=Delivery.Channel.WEBHOOK,
                        endpoint=endpoint,
                        target=endpoint.url,
                        next_attempt_at=due,
                    )
            if user.email and preferences.wants(kind):
                # User.email holds the confirmed address only (EmailAddress).
                Delivery.objects.create(
                    notification=notification,
                    channel=Delivery.Channel.EMAIL,
                    target=user.email,
                    next_attempt_at=due,
                )
            return notification


class Notification(models.Model):
    """Something a host is told: one row per event, whatever the number of channels."""

    class Kind(models.TextChoices):
        OFFLINE = "island.offline", "An Island went offline"
        ONLINE = "island.online", "An Island is back online"
        LINKED = "island.linked", "A new Island was linked"
        KARMA_LEVEL = "island.karma_level", "An Island's karma level changed"
        FLAPPING = "island.flapping", "An Island kept going up and down"
        TEST = "test", "A test event"
        WEBHOOK_PAUSED = "webhook.paused", "A webhook endpoint was paused"

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="notifications")
    # Not a foreign key to islands.Island on purpose: the notice outlives the
    # Island (a "This wasn't me" removal must not delete its own notice).
    island_id = models.UUIDField(null=True, blank=True)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    # What makes it once-only: e.g. "offline:<status change id>".
    key = models.CharField(max_length=100, unique=True)
    data = models.JSONField(default=dict)
    created_at = models.DateTimeField()
    # The silence an offline alert is about (islands.StatusChange, not a
    # foreign key for the same reason as island_id), and when the watcher
    # saw it end (notify.alerts.record_returns): set once, by one watcher.
    status_change_id = models.BigIntegerField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    objects = NotificationManager()

    class Meta:
        indexes = [
            # The account's recent notifications, newest first (settings page, flapping counts).
            models.Index(fields=["user", "-created_at"], name="notification_user_idx"),
            # The watcher's look for returns: offline alerts whose silence has
            # not ended yet. Partial, so the history costs it nothing.
            models.Index(
                fields=["status_change_id"],
                condition=models.Q(kind="island.offline", resolved_at__isnull=True),
                name="notification_unresolved_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} for {self.user_id} ({self.key})"


class DeliveryManager(models.Manager["Delivery"]):
    def due(self, now: datetime) -> "models.QuerySet[Delivery]":
        return self.filter(status=Delivery.Status.PENDING, next_attempt_at__lte=now).filter(
            models.Q(claimed_until__isnull=True) | models.Q(claimed_until__lt=now)
        )

    def claim(self, now: datetime, limit: int = SEND_BATCH) -> list["Delivery"]:
        """Claim up to `limit` due deliveries for this sender.

        Each claim is one conditional UPDATE whose row count decides: of two
        senders that read the same candidate, one wins it, the other skips it.
        """
        claimed = []
        for pk in self.due(now).order_by("next_attempt_at").values_list("pk", flat=True)[:limit]:
            token = uuid.uuid4()
            won = (
                self.due(now)
                .filter(pk=pk)
                .update(claim=token, claimed_until=now + CLAIM_LEASE, attempts=models.F("attempts") + 1)
            )
            if won:
                claimed.append(self.select_related("notification__user", "endpoint__user").get(pk=pk))
        return claimed


class Delivery(models.Model):
    """One notification to one destination (an email address, a webhook endpoint): the outbox row."""

    class Channel(models.TextChoices):
        EMAIL = "email", "Email"
        WEBHOOK = "webhook", "Webhook"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed"
        # Not sent, on purpose: the Island came back within the grace, or is in maintenance.
        SKIPPED = "skipped", "Not needed"

    notification = models.ForeignKey(Notification, on_delete=models.CASCADE, related_name="deliveries")
    # The endpoint of a webhook delivery (its secret signs it); deleting the endpoint deletes these.
    endpoint = models.ForeignKey(
        WebhookEndpoint, null=True, blank=True, on_delete=models.CASCADE, related_name="deliveries"
    )
    channel = models.CharField(max_length=8, choices=Channel.choices)
    # The address or URL it goes to, fixed when it was written.
    target = models.CharField(max_length=2000)
    # Stable across retries and takeovers: the email's Message-ID, the webhook-id.
    message_id = models.CharField(max_length=40, unique=True, default=_message_id, editable=False)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    claim = models.UUIDField(null=True, blank=True, editable=False)
    claimed_until = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)

    objects = DeliveryManager()

    class Meta:
        verbose_name_plural = "deliveries"
        indexes = [
            # The sender's claim query: pending rows by due time; partial, so
            # the sent history costs it nothing.
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(status="pending"),
                name="delivery_due_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.channel} {self.message_id} ({self.status})"

    def mark_sent(self, now: datetime) -> bool:
        """Mark it sent if this sender still holds the claim (a taken-over claim is not ours)."""
        return bool(
            Delivery.objects.filter(pk=self.pk, claim=self.claim, status=self.Status.PENDING).update(
                status=self.Status.SENT, sent_at=now, claim=None, claimed_until=None, last_error=""
            )
        )

    def mark_failed(self, now: datetime, error: str) -> None:
        """Schedule the next try with backoff, or give up after MAX_ATTEMPTS.

        A webhook given up pauses its endpoint, and the owner is emailed.
        """
        given_up = self.attempts >= MAX_ATTEMPTS
        if given_up:
            update: dict[str, object] = {"status": self.Status.FAILED}
        else:
            update = {"next_attempt_at": now + RETRY_BASE * 2 ** (self.attempts - 1)}
        with transaction.atomic():
            marked = Delivery.objects.filter(pk=self.pk, claim=self.claim).update(
                claim=None, claimed_until=None, last_error=error[:500], **update
            )
            if marked and given_up and self.endpoint is not None:
                self.endpoint.pause(now, error)

    def mark_skipped(self, now: datetime, why: str) -> None:
        """Not sent on purpose (the event stopped mattering before its time came)."""
        Delivery.objects.filter(pk=self.pk, claim=self.claim).update(
            status=self.Status.SKIPPED, claim=None, claimed_until=None, last_error=why[:500]
        )

    def postpone(self, until: datetime) -> None:
        """Look again at `until`; the claim that found it not due yet is not an attempt."""
        Delivery.objects.filter(pk=self.pk, claim=self.claim).update(
            next_attempt_at=until, claim=None, claimed_until=None, attempts=models.F("attempts") - 1
        )


def send_test_event(endpoint: WebhookEndpoint, now: datetime) -> Delivery:
    """A test event for this endpoint only ("Send test event"), signed and retried like any other."""
    with transaction.atomic():
        notification = Notification.objects.create(
            user=endpoint.user,
            kind=Notification.Kind.TEST,
            key=f"test:{endpoint.pk}:{uuid.uuid4().hex}",
            data={"message": "A test event from Archipelag.io", "endpoint": endpoint.url},
            created_at=now,
        )
        return Delivery.objects.create(
            notification=notification,
            channel=Delivery.Channel.WEBHOOK,
            endpoint=endpoint,
            target=endpoint.url,
            next_attempt_at=now,
        )
