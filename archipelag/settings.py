"""Settings for the Archipelag.io Islands coordinator.

Everything is read from the environment. With nothing set, the service runs
on embedded defaults (a SQLite file, the in-memory channel layer and a local
memory cache) so `make run` works on a fresh machine. Production sets
DATABASE_URL, REDIS_URL, NATS_URL, SECRET_KEY, DEBUG=0, ALLOWED_HOSTS and
PUBLIC_URL; see README.md and docs/deploy.md.
"""

import os
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dj_database_url
import django_stubs_ext
from django.utils.csp import CSP

# Lets classes such as ModelAdmin[Island] be subscripted at runtime, as the
# type stubs write them.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent

# This key only exists so the embedded default starts with no configuration.
# A system check (archipelag.checks) refuses it whenever DEBUG is off.
DEV_SECRET_KEY = "dev-only-insecure-key-do-not-use-in-production"  # noqa: S105


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


SECRET_KEY = env_str("SECRET_KEY", DEV_SECRET_KEY)
DEBUG = env_bool("DEBUG", True)

# The origin the coordinator is reached at. It goes into `pair_url` and into
# the QR codes shown at /pair/mobile, so it must be what users and Islands see.
PUBLIC_URL = env_str("PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]" if DEBUG else "")
_public_host = urlsplit(PUBLIC_URL).hostname
if _public_host and _public_host not in ALLOWED_HOSTS and "*" not in ALLOWED_HOSTS:
    ALLOWED_HOSTS.append(_public_host)
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", PUBLIC_URL)

INSTALLED_APPS = [
    # archipelag first: its runserver (daphne's, with request bodies bounded
    # as archipelag/server.py bounds them in production) replaces daphne's,
    # which replaces Django's; daphne's serves HTTP and websockets.
    "archipelag",
    "daphne",
    # django.contrib.admin, with a login counted like the site's (archipelag.admin.AdminSite).
    "archipelag.apps.AdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "django_htmx",
    "pairing",
    "islands",
    "karma",
    # Email addresses and what hosts are told (notify/: docs/notifications.md).
    "notify",
    # The simulators and the karma example (manage.py island, karma_example).
    "simulator",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # The Content-Security-Policy header (SECURE_CSP below) on every page.
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # After HtmxMiddleware, which sets request.htmx.
    "archipelag.middleware.HtmxLoginRedirectMiddleware",
    # Last: a view's transient database error (a pool with no connection to
    # give) becomes a 503 with Retry-After before anything else sees it.
    "archipelag.middleware.DatabaseUnavailableMiddleware",
]

# The JSON API's whole middleware (requests under /api/, routed in asgi.py
# by archipelag/handlers.py): no sessions, CSRF, auth, messages, htmx or
# static files, which API clients neither send nor need. Each entry must run
# in both sync and async mode.
API_MIDDLEWARE = ["archipelag.middleware.ApiMiddleware"]

ROOT_URLCONF = "archipelag.urls"
ASGI_APPLICATION = "archipelag.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                # Whether the account has a confirmed email, for the nudge on /settings.
                "notify.context_processors.account_email",
            ],
        },
    },
]


SQLITE_OPTIONS = {
    # IMMEDIATE takes the write lock when a transaction starts, so two
    # writers queue on busy_timeout instead of one failing with "database is
    # locked" when it upgrades a read lock.
    "transaction_mode": "IMMEDIATE",
    "timeout": 20,
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
}


def _database(url: str) -> dict[str, Any]:
    if not url:
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": BASE_DIR / "db.sqlite3",
            "OPTIONS": dict(SQLITE_OPTIONS),
            # A file, not :memory:, so a daphne process started by a test
            # (browser and websocket tests) sees the same test database.
            "TEST": {"NAME": str(BASE_DIR / ".pytest-db.sqlite3")},
        }
    config: dict[str, Any] = dict(dj_database_url.parse(url, conn_health_checks=True))
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # A SQLite file named by URL (a second copy, the tests' daphne) shares
        # the default file's options: without them, concurrent writers fail
        # at once with "database is locked" and the API answers 503.
        config["OPTIONS"] = {**SQLITE_OPTIONS, **config.get("OPTIONS", {})}
    if config["ENGINE"] == "django.db.backends.postgresql":
        # No JIT: this service runs short OLTP statements, and PostgreSQL's
        # JIT once spent over ten minutes compiling one wide bulk UPDATE here,
        # deaf to pg_terminate_backend. Plans stay interpreted and predictable.
        config.setdefault("OPTIONS", {})["options"] = "-c jit=off"
    if config["ENGINE"] == "django.db.backends.postgresql" and env_bool("DATABASE_POOL", True):
        # A pool instead of persistent connections: under ASGI every request
        # runs in a fresh thread, so CONN_MAX_AGE would leak a connection per
        # thread while connecting per request costs several milliseconds.
        # With CONN_HEALTH_CHECKS the pool checks a connection before handing
        # it out, so a restarted PostgreSQL costs no failed request.
        config["CONN_MAX_AGE"] = 0
        config.setdefault("OPTIONS", {})["pool"] = {
            "min_size": env_int("DATABASE_POOL_MIN", 2),
            "max_size": env_int("DATABASE_POOL_MAX", 20),
            # How long a request waits for a connection when all are in use
            # before it is answered 503 with Retry-After.
            "timeout": env_int("DATABASE_POOL_TIMEOUT", 10),
        }
    return config


DATABASES = {"default": _database(env_str("DATABASE_URL"))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            # The cache holds rate-limit counters, read and written in a
            # millisecond. A Redis that hangs must fail a request's counting
            # in seconds (archipelag/ratelimit.py says what happens then), not
            # hold it for redis-py's default 5 s per command.
            "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            # channels-redis's layer, with a pool that queues when it is full
            # rather than raising (archipelag/channel_layer.py).
            "BACKEND": "archipelag.channel_layer.RedisChannelLayer",
            "CONFIG": {
                "hosts": [
                    {
                        "address": REDIS_URL,
                        # redis-py's async pool stops at 100 connections by
                        # default and raises MaxConnectionsError, which turns
                        # a burst of websocket handshakes into 500s. Ours is
                        # larger, and past its size an operation waits up to
                        # pool_timeout seconds for a connection.
                        "max_connections": env_int("CHANNEL_LAYER_MAX_CONNECTIONS", 2000),
                        "pool_timeout": 10,
                        # channels-redis blocks in BZPOPMIN for 5 s; redis-py's
                        # 5 s default read timeout would race it and kill the
                        # consumer with "Timeout reading". Allow well over 5 s.
                        "socket_timeout": 30,
                        "socket_connect_timeout": 5,
                    }
                ],
                "capacity": 1000,
                "expiry": 60,
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

NATS_URL = env_str("NATS_URL", "nats://127.0.0.1:4222")
# The NATS address Islands are given in their key's `nats_url` (shown once at
# /pair): what the agents reach, which is rarely what the service's own
# processes use. `tls://` in production (the agent then requires TLS).
NATS_PUBLIC_URL = env_str("NATS_PUBLIC_URL", "nats://127.0.0.1:4222")
# The NATS auth callout (manage.py nats_auth; docs/nats.md). Its issuer
# account seed (S...) signs every user it admits; by default it is derived
# from SECRET_KEY so the printed server config and the callout agree.
NATS_AUTH_ISSUER_SEED = env_str("NATS_AUTH_ISSUER_SEED")
# A keyed Island's NATS user expires after this long; the agent reconnects
# through the callout, so a revoked key is shut out within this time.
NATS_KEY_SESSION_SECONDS = env_int("NATS_KEY_SESSION_SECONDS", 60)
# The shared credential agents were installed with before keys. Off unless
# set: its connections may still speak for any host (docs/security.md).
NATS_ALLOW_LEGACY_USER = env_bool("NATS_ALLOW_LEGACY_USER", False)
NATS_LEGACY_USER = env_str("NATS_LEGACY_USER")
NATS_LEGACY_PASSWORD = env_str("NATS_LEGACY_PASSWORD")
# What hosts that are not linked (anyone may make host ids up) can hold over
# NATS: unused pairing codes in the database and registrations in Redis.
# Past either, the oldest goes first (docs/security.md has the arithmetic).
NATS_PENDING_CODES_MAX = env_int("NATS_PENDING_CODES_MAX", 100_000)
NATS_PENDING_REGISTRATIONS_MAX = env_int("NATS_PENDING_REGISTRATIONS_MAX", 20_000)

# An Island counts as online while its last heartbeat is younger than this
# many seconds. The agent beats every 10 s, so the default allows three
# missed beats plus a margin for network and scheduling delays.
ISLAND_OFFLINE_AFTER = env_int("ISLAND_OFFLINE_AFTER", 45)

# What an Island asks per job when its heartbeats name no price for the
# workload and no `_default` (credits, as a decimal string).
DEFAULT_ASK = Decimal(env_str("DEFAULT_ASK", "1"))

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Django's ModelBackend, giving its pooled connection back while it hashes
# a password, and hashing at most PASSWORD_HASHING_CONCURRENCY passwords at
# once per process (archipelag/auth.py). Half the cores by default: a burst
# of wrong passwords then leaves the other half to everything else. An
# attempt that waits longer than PASSWORD_HASHING_WAIT seconds for its turn
# is answered 503 with Retry-After.
AUTHENTICATION_BACKENDS = ["archipelag.auth.PoolFriendlyModelBackend"]
PASSWORD_HASHING_CONCURRENCY = env_int("PASSWORD_HASHING_CONCURRENCY", max(1, (os.cpu_count() or 2) // 2))
PASSWORD_HASHING_WAIT = env_int("PASSWORD_HASHING_WAIT", 10)
# Django's database sessions, refusing to look up keys it never issues.
SESSION_ENGINE = "archipelag.sessions"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "islands:settings"
LOGOUT_REDIRECT_URL = "home"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}

# In development whitenoise serves straight from the app and project static
# directories; in production from STATIC_ROOT, collected at image build time.
WHITENOISE_USE_FINDERS = DEBUG
WHITENOISE_AUTOREFRESH = DEBUG

# Number of reverse proxies in front of the service that append to
# X-Forwarded-For. Zero means REMOTE_ADDR is the client: a header the client
# sent itself must never decide which rate-limit bucket it lands in.
NUM_PROXIES = env_int("NUM_PROXIES", 0)

# Production hardening. These follow DEBUG so `check --deploy` is clean with
# production settings, and can be relaxed one by one for local benchmarks.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", not DEBUG)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
if env_bool("SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
X_FRAME_OPTIONS = "DENY"
# Pages load scripts, styles, fonts and images from this site only (the QR
# codes are data: URIs), talk to it only (fetch, htmx, the pairing
# websocket: 'self' covers ws: and wss: to this host), and run no inline
# script at all, so an injected <script> or on*= handler does nothing.
# Inline style *attributes* are allowed (the Island page's bars are sized
# with them); they cannot run script, and <style> elements stay refused.
# htmx's own indicator <style> is turned off in base.html's htmx-config.
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF],
    "style-src-attr": [CSP.UNSAFE_INLINE],
    "img-src": [CSP.SELF, "data:"],
    "connect-src": [CSP.SELF],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.NONE],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
}
# The largest form body, as archipelag/server.py's PAGE_MAX_BODY_BYTES bounds
# it under daphne before Django sees it.
DATA_UPLOAD_MAX_MEMORY_SIZE = 256 * 1024

# Email, configured from the environment with Django's own names (EMAIL_HOST,
# EMAIL_PORT, EMAIL_HOST_USER, EMAIL_HOST_PASSWORD, EMAIL_USE_TLS,
# EMAIL_USE_SSL, EMAIL_TIMEOUT, DEFAULT_FROM_EMAIL). Django 6.1 deprecates
# them as settings in favour of MAILERS, so they are read here and put in
# MAILERS. With no EMAIL_HOST the embedded default prints each email to the
# console of `make run`, so a newcomer can click the confirmation link.
# Quoted: the period in the name is not allowed in an unquoted phrase (RFC 5322).
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", '"Archipelag.io" <noreply@localhost>')
SERVER_EMAIL = env_str("SERVER_EMAIL", DEFAULT_FROM_EMAIL)
if env_str("EMAIL_HOST"):
    MAILERS = {
        "default": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {
                "host": env_str("EMAIL_HOST"),
                "port": env_int("EMAIL_PORT", 25),
                "username": env_str("EMAIL_HOST_USER"),
                "password": env_str("EMAIL_HOST_PASSWORD"),
                "use_tls": env_bool("EMAIL_USE_TLS", False),
                "use_ssl": env_bool("EMAIL_USE_SSL", False),
                # A slow mail server must not hold the sender for long.
                "timeout": env_int("EMAIL_TIMEOUT", 10),
            },
        }
    }
else:
    # With DEBUG, links printed whole (archipelag.mail); without, Django's own
    # console backend, which `check --deploy` recognises and refuses.
    _console = "archipelag.mail.ConsoleBackend" if DEBUG else "django.core.mail.backends.console.EmailBackend"
    MAILERS = {"default": {"BACKEND": _console}}
# How long the notification sender holds a delivery it claimed before
# another sender may take it over (a sender killed mid-send).
NOTIFY_CLAIM_LEASE = env_int("NOTIFY_CLAIM_LEASE", 60)
# How long a confirmation link in an email stays valid.
EMAIL_CONFIRMATION_DAYS = env_int("EMAIL_CONFIRMATION_DAYS", 3)
# How long an Island may stay silent before its owner is told, in seconds,
# for owners who have not chosen on /settings/notifications (0 to 3600).
NOTIFY_OFFLINE_GRACE = env_int("NOTIFY_OFFLINE_GRACE", 300)
# Webhooks to loopback, private and link-local addresses, and over plain
# http://: refused unless this is on (it is with DEBUG, for local receivers
# and tests). Never in production: webhooks must not reach the service's own network.
WEBHOOKS_ALLOW_PRIVATE = env_bool("WEBHOOKS_ALLOW_PRIVATE", DEBUG)

LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "archipelag.logfmt.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            # LOG_FORMAT=json: one JSON object per line, for log pipelines.
            "formatter": "json" if env_str("LOG_FORMAT", "plain") == "json" else "plain",
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        # Daphne logs every request line at INFO; the access log belongs to
        # the load balancer in production.
        "daphne": {"level": "WARNING"},
        # runserver prints its own access log; don't print each line twice.
        "django.channels.server": {"propagate": False},
    },
}
