"""The NATS auth callout: every Island connection gets a user scoped to its own host id.

A NATS server (2.10 or later) in callout mode (`manage.py nats_server_config`)
sends each client's CONNECT to `$SYS.REQ.USER.AUTH` as an authorization
request JWT, signed by the server. `manage.py nats_auth` answers it here with
an authorization response JWT carrying a user JWT, both signed by the issuer
account key the server was configured with. The user JWT fixes the
connection's permissions for its whole life:

* an Island key (islands.models.IslandKey) may publish only what the agent
  publishes for its own host id, subscribe only to its own subjects, and use
  JetStream only for its own consumer `host-<id>` on the JOBS stream;
* the legacy shared user (only when NATS_ALLOW_LEGACY_USER is on) keeps
  today's host-wide permissions, and is counted apart;
* anything else is refused at connect.

User JWTs expire after NATS_KEY_SESSION_SECONDS, so the server closes the
connection then and the agent reconnects through this callout again: a
revoked key is out within that time without a system-account user.

It is its own process rather than part of the bridge: if the bridge stalls
on the database, heartbeats queue but agents still connect; if this process
stalls, nobody new connects but the bridge keeps serving those connected.
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import nacl.exceptions
import nacl.signing
import nkeys
from django.conf import settings
from django.utils import timezone

from islands.models import IslandKey

logger = logging.getLogger("archipelag.nats_auth")

AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"
JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
# The account NATS puts configured users in when no accounts are declared.
GLOBAL_ACCOUNT = "$G"
AUTH_REQUEST_AUDIENCE = "nats-authorization-request"
MAX_REQUEST_BYTES = 64 * 1024


class BadRequest(Exception):
    """An authorization request that does not decode or verify."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issuer_seed() -> bytes:
    """The issuer account's nkey seed (S...): NATS_AUTH_ISSUER_SEED, or derived from SECRET_KEY.

    Derived by default so the printed server configuration and this process
    agree with nothing else to configure; a deployment may set its own.
    """
    if settings.NATS_AUTH_ISSUER_SEED:
        return settings.NATS_AUTH_ISSUER_SEED.encode()
    raw = hmac.new(
        settings.SECRET_KEY.encode(), b"archipelag nats auth callout issuer", hashlib.sha256
    ).digest()
    return bytes(nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_ACCOUNT))


def issuer() -> nkeys.KeyPair:
    return nkeys.from_seed(issuer_seed())


def _verify_key(public_key: str) -> nacl.signing.VerifyKey:
    """The Ed25519 key inside a NATS public nkey (N..., A..., U...)."""
    try:
        raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    except (binascii.Error, ValueError):
        raise BadRequest("malformed public key") from None
    if len(raw) != 35:
        raise BadRequest("malformed public key")
    return nacl.signing.VerifyKey(raw[1:33])


def encode_jwt(claims: dict[str, Any], signer: nkeys.KeyPair) -> str:
    body = {**claims, "iss": signer.public_key.decode(), "iat": int(time.time())}
    # jti: a hash of the claims, as NATS's own JWT library makes it.
    body["jti"] = base64.b32encode(
        hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    ).decode()
    body["jti"] = body["jti"].rstrip("=")
    signing_input = f"{_b64encode(json.dumps(JWT_HEADER).encode())}.{_b64encode(json.dumps(body).encode())}"
    signature = signer.sign(signing_input.encode())
    return f"{signing_input}.{_b64encode(signature)}"


def decode_jwt(token: str) -> dict[str, Any]:
    """Decode a JWT signed with the nkey named in its own `iss`, checking that signature."""
    parts = token.split(".")
    if len(parts) != 3:
        raise BadRequest("not a JWT")
    try:
        claims = json.loads(_b64decode(parts[1]))
        signature = _b64decode(parts[2])
    except (ValueError, binascii.Error):
        raise BadRequest("not a JWT") from None
    if not isinstance(claims, dict) or not isinstance(claims.get("iss"), str):
        raise BadRequest("no issuer")
    try:
        _verify_key(claims["iss"]).verify(f"{parts[0]}.{parts[1]}".encode(), signature)
    except nacl.exceptions.BadSignatureError:
        raise BadRequest("bad signature") from None
    return claims


# --- Who may do what -------------------------------------------------------------


@dataclass(frozen=True)
class Permissions:
    pub: list[str]
    sub: list[str]
    kind: str
    host_id: str = ""
    expires_in: int | None = None
    deny_sub: list[str] = field(default_factory=list)


def _inboxes() -> list[str]:
    # The unmodified agent (async-nats) takes its replies and pull deliveries
    # on inboxes under the default `_INBOX.` prefix with names it draws after
    # connecting, so the callout cannot narrow them to this connection: a
    # wildcard allow also admits `_INBOX.>` itself. Any connected Island can
    # therefore read replies meant for others (docs/security.md says so;
    # only an account per Island closes that, docs/nats.md).
    return ["_INBOX.>"]


def island_permissions(host_id: str, prefix: str = "", stream: str = "JOBS") -> Permissions:
    """Exactly what the agent does for its own host id (src/nats.rs of the agent)."""
    own = f"{prefix}host.{host_id}"
    consumer = f"host-{host_id}"
    return Permissions(
        kind="island_key",
        host_id=host_id,
        pub=[
            f"{prefix}coordinator.hosts.register",
            f"{prefix}coordinator.hosts.pairing",
            *(f"{own}.{kind}" for kind in ("heartbeat", "status", "lease", "ping", "output", "progress")),
            # JetStream, its own consumer only: look the stream up, bind,
            # pull, ack. Creating is allowed only with its own filter subject
            # (the filter is the create subject's last tokens since NATS
            # 2.10), so no Island makes a consumer that reads another's jobs.
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.CONSUMER.INFO.{stream}.{consumer}",
            f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}.{own}.jobs",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
            f"$JS.ACK.{stream}.{consumer}.>",
        ],
        sub=[*(f"{own}.{kind}" for kind in ("jobs", "cancel", "preload", "probe")), *_inboxes()],
        expires_in=settings.NATS_KEY_SESSION_SECONDS,
    )


def legacy_permissions(prefix: str = "") -> Permissions:
    """The shared credential's: any host's subjects, as before keys (it can still forge)."""
    return Permissions(
        kind="legacy",
        pub=[
            f"{prefix}coordinator.hosts.register",
            f"{prefix}coordinator.hosts.pairing",
            *(
                f"{prefix}host.*.{kind}"
                for kind in ("heartbeat", "status", "lease", "ping", "output", "progress")
            ),
            "$JS.API.STREAM.INFO.*",
            "$JS.API.CONSUMER.>",
            "$JS.ACK.>",
        ],
        sub=[*(f"{prefix}host.*.{kind}" for kind in ("jobs", "cancel", "preload", "probe")), "_INBOX.>"],
        # Short-lived too, so turning NATS_ALLOW_LEGACY_USER off ends these
        # connections within a session, not at their next reconnect.
        expires_in=settings.NATS_KEY_SESSION_SECONDS,
    )


class ConnectOptions(msgspec.Struct, omit_defaults=True):
    user: str = ""
    # NATS sends the password as `pass`.
    password: str = msgspec.field(default="", name="pass")
    name: str = ""


class ServerId(msgspec.Struct):
    id: str


class AuthRequest(msgspec.Struct):
    server_id: ServerId
    user_nkey: str
    connect_opts: ConnectOptions = msgspec.field(default_factory=ConnectOptions)


@dataclass
class Decision:
    permissions: Permissions | None
    user: str
    error: str = ""
    key_id: int | None = None


def decide(
    user: str, password: str, now: datetime | None = None, prefix: str = "", stream: str = "JOBS"
) -> Decision:
    """Which permissions these credentials get, or why none (sync: it reads the database)."""
    now = now or timezone.now()
    if user.startswith("isl-"):
        key = IslandKey.objects.authenticate(user, password, now)
        if key is None:
            return Decision(None, user, "unknown, revoked or expired Island key")
        return Decision(island_permissions(key.host_id, prefix, stream), user, key_id=key.pk)
    legacy_user, legacy_password = settings.NATS_LEGACY_USER, settings.NATS_LEGACY_PASSWORD
    if (
        settings.NATS_ALLOW_LEGACY_USER
        and legacy_user
        and hmac.compare_digest(user.encode(), legacy_user.encode())
        and hmac.compare_digest(password.encode(), legacy_password.encode())
    ):
        return Decision(legacy_permissions(prefix), user)
    return Decision(None, user, "authorization violation")


def user_claims(request: AuthRequest, permissions: Permissions, name: str) -> dict[str, Any]:
    nats: dict[str, Any] = {
        "pub": {"allow": permissions.pub},
        "sub": {"allow": permissions.sub, **({"deny": permissions.deny_sub} if permissions.deny_sub else {})},
        "subs": -1,
        "data": -1,
        "payload": -1,
        "type": "user",
        "version": 2,
    }
    claims: dict[str, Any] = {"sub": request.user_nkey, "name": name, "aud": GLOBAL_ACCOUNT, "nats": nats}
    if permissions.expires_in:
        claims["exp"] = int(time.time()) + permissions.expires_in
    return claims


def response_jwt(request: AuthRequest, signer: nkeys.KeyPair, user_jwt: str = "", error: str = "") -> str:
    nats: dict[str, Any] = {"type": "authorization_response", "version": 2}
    if user_jwt:
        nats["jwt"] = user_jwt
    if error:
        nats["error"] = error
    return encode_jwt({"sub": request.user_nkey, "aud": request.server_id.id, "nats": nats}, signer)


def parse_request(token: bytes, signer: nkeys.KeyPair) -> AuthRequest:
    if len(token) > MAX_REQUEST_BYTES:
        raise BadRequest("too large")
    claims = decode_jwt(token.decode(errors="replace"))
    # The server signs with a key it makes at start, so its signature proves
    # only that the request is whole; the subject is what protects it (only
    # the server publishes on $SYS.REQ.USER.AUTH).
    if (
        claims.get("aud") != AUTH_REQUEST_AUDIENCE
        or (claims.get("nats") or {}).get("type") != "authorization_request"
    ):
        raise BadRequest(f"not an authorization request (aud={claims.get('aud')!r})")
    try:
        return msgspec.convert(claims.get("nats"), AuthRequest)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"malformed request: {exc}") from None


def answer(
    token: bytes, signer: nkeys.KeyPair, prefix: str = "", stream: str = "JOBS"
) -> tuple[Decision | None, str]:
    """The response JWT for one authorization request, and the decision behind it."""
    request = parse_request(token, signer)
    opts = request.connect_opts
    decision = decide(opts.user, opts.password, prefix=prefix, stream=stream)
    if decision.permissions is None:
        return decision, response_jwt(request, signer, error=decision.error)
    user_jwt = encode_jwt(user_claims(request, decision.permissions, opts.user), signer)
    return decision, response_jwt(request, signer, user_jwt=user_jwt)


def random_service_password() -> str:
    """A password for the service's own NATS user with none of `:@/%` in it."""
    return secrets.token_urlsafe(24)


# --- The long-running service ------------------------------------------------------

QUEUE_GROUP = "archipelag-nats-auth"
USAGE_FLUSH_SECONDS = 5.0
# How often the counters are logged, as the bridge does: legacy admissions
# apart from keys', so an operator sees how many agents are still on the
# shared credential (docs/nats.md, moving a fleet).
STATS_INTERVAL = 60.0


def record_use(key_ids: set[int], now: datetime) -> int:
    """Stamp last use, and first use where there was none, in one statement."""
    from django.db import close_old_connections
    from django.db.models import Value
    from django.db.models.functions import Coalesce

    close_old_connections()
    return IslandKey.objects.filter(pk__in=key_ids).update(
        last_used_at=now, first_used_at=Coalesce("first_used_at", Value(now))
    )


class AuthService:
    """Subscribes to the callout subject and answers each request; see `manage.py nats_auth`."""

    def __init__(self, url: str, *, prefix: str = "", stream: str = "JOBS") -> None:
        self.url = url
        self.prefix = prefix
        self.stream = stream
        self.signer = issuer()
        self.counters: dict[str, int] = {}
        self.nc: Any = None
        # Keys admitted since the last flush. A thousand agents connecting at
        # once make one UPDATE per flush, not a thousand.
        self.used: set[int] = set()
        self._flusher: asyncio.Task[None] | None = None

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def log_stats(self, event: str = "nats_auth_stats") -> None:
        names = ("admitted_island_key", "admitted_legacy", "refused", "bad_requests", "failed")
        logger.info("event=%s %s", event, " ".join(f"{name}={self.counters.get(name, 0)}" for name in names))

    def _answer(self, token: bytes) -> tuple[Decision | None, str]:
        from django.db import close_old_connections

        close_old_connections()
        return answer(token, self.signer, self.prefix, self.stream)

    async def on_request(self, msg: Any) -> None:
        from asgiref.sync import sync_to_async

        try:
            decision, token = await sync_to_async(self._answer, thread_sensitive=False)(msg.data)
        except BadRequest as exc:
            # Not from our server, or not for our issuer: nothing to sign.
            self._count("bad_requests")
            logger.warning("event=nats_auth_bad_request error=%s", exc)
            return
        except Exception:
            self._count("failed")
            logger.exception("event=nats_auth_failed")
            return
        if decision is not None and decision.permissions is not None:
            if decision.key_id is not None:
                self.used.add(decision.key_id)
            self._count(f"admitted_{decision.permissions.kind}")
            logger.info(
                "event=nats_auth_admitted kind=%s user=%s host_id=%s",
                decision.permissions.kind,
                decision.user,
                decision.permissions.host_id,
            )
        else:
            self._count("refused")
            logger.warning("event=nats_auth_refused user=%s", decision.user if decision else "")
        if msg.reply:
            await msg.respond(token.encode())

    async def start(self) -> None:
        import nats

        self.nc = await nats.connect(self.url, name="archipelag-nats-auth", max_reconnect_attempts=-1)
        await self.nc.subscribe(AUTH_SUBJECT, queue=QUEUE_GROUP, cb=self.on_request)
        await self.nc.flush()
        self._flusher = asyncio.create_task(self._flush_loop())
        logger.info("event=nats_auth_started issuer=%s", self.signer.public_key.decode())

    async def _flush_loop(self) -> None:
        since_stats = 0.0
        while True:
            await asyncio.sleep(USAGE_FLUSH_SECONDS)
            since_stats += USAGE_FLUSH_SECONDS
            if since_stats >= STATS_INTERVAL:
                since_stats = 0.0
                self.log_stats()
            try:
                await self.flush_usage()
            except Exception:
                logger.exception("event=nats_auth_usage_failed")

    async def flush_usage(self) -> int:
        """Record first and last use of the keys admitted since the last flush; one UPDATE."""
        from asgiref.sync import sync_to_async

        ids, self.used = self.used, set()
        if not ids:
            return 0
        try:
            return await sync_to_async(record_use, thread_sensitive=False)(ids, timezone.now())
        except Exception:
            self.used |= ids  # next time, then
            raise

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
            self.log_stats("nats_auth_stopped")
        if self.nc is not None:
            try:
                await self.nc.drain()
            except Exception as exc:  # the server went first: nothing left to drain
                logger.info("event=nats_auth_drain_failed error=%r", exc)
                await self.nc.close()
            self.nc = None
