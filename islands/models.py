import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from islands.templatetags.island_tags import gigabytes
from pairing.codes import generate_secret, hash_secret

if TYPE_CHECKING:
    from django.contrib.auth.models import User

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


class IslandQuerySet(models.QuerySet["Island"]):
    def active(self) -> "IslandQuerySet":
        return self.filter(removed_at__isnull=True)

    def owned_by(self, user: "User") -> "IslandQuerySet":
        return self.active().filter(owner=user)

    def can_run(self, runtime: str) -> "IslandQuerySet":
        """Active Islands able to run cargos built for `runtime`, online or not.

        Routing combines this with online status, e.g. `.can_run("coreml").online()`.
        """
        return self.active().filter(runtime_capability(runtime))


class IslandManager(models.Manager["Island"]):
    def get_queryset(self) -> IslandQuerySet:
        return IslandQuerySet(self.model, using=self._db)

    def active(self) -> IslandQuerySet:
        return self.get_queryset().active()

    def owned_by(self, user: "User") -> IslandQuerySet:
        return self.get_queryset().owned_by(user)

    def can_run(self, runtime: str) -> IslandQuerySet:
        return self.get_queryset().can_run(runtime)

    def linked_host(self, host_id: str) -> "Island | None":
        return self.active().select_related("owner").filter(host_id=host_id).first()

    def authenticate(self, token: str, now: datetime | None = None) -> "Island | None":
        """The active Island holding this API token, or None.

        Only the token's hash is stored, so a lookup hashes what was presented.
        Removed Islands have no token hash; expired tokens are refused here.
        """
        if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
            return None
        now = now or timezone.now()
        return (
            self.active()
            .filter(token_hash=hash_secret(token))
            .filter(Q(token_expires_at__isnull=True) | Q(token_expires_at__gt=now))
            .first()
        )


class Island(models.Model):
    class Kind(models.TextChoices):
        DESKTOP = "desktop", "Desktop or server"
        MOBILE = "mobile", "Mobile"

    class Platform(models.TextChoices):
        IOS = "ios", "iOS"
        ANDROID = "android", "Android"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="islands")
    host_id = models.CharField(max_length=64)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.DESKTOP)
    name = models.CharField(max_length=100)

    # Hardware, as the Island reported it when pairing or registering.
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
        ]
        indexes = [
            # Serves "Your Islands": the active Islands of one owner.
            models.Index(fields=["owner", "removed_at"], name="island_owner_idx"),
        ]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self.name:
            self.name = self.default_name()
        super().save(*args, **kwargs)

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
