from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import User
from django.core import signing
from django.db import IntegrityError, models, transaction
from django.db.models.functions import Lower
from django.utils import timezone

CONFIRM_SALT = "notify.email.confirm"


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
