"""Fixed-window counters in the shared cache, for anything guessable.

Counters live in Django's default cache: Redis in production, so every
process shares them; local memory with the embedded default. Every limit
counts first: `attempt()` increments and the count it gets back decides
(one Lua script on Redis, a lock around add/incr in local memory), so of any
number of concurrent attempts at most the limit go ahead. Where only
failures count, a successful attempt is taken back with `refund()`. Windows are aligned to the clock
(a 15-minute window runs :00-:15, :15-:30, ...), which makes the wait
before the next attempt easy to state exactly. What is limited, and by how
much, is each caller's business (pairing/limits.py).

When the cache cannot be reached (Redis restarting, out of memory), a
counter can be neither read nor written. Each caller then says what the
action is worth without it:

- Closed (the default): anything that bounds the odds of guessing a code,
  i.e. redeeming a typed code and issuing codes (which sets how many are
  live), raises `Unavailable`, and the caller answers 503 with Retry-After.
  Counting nothing would make the odds in docs/security.md unbounded.
- Open (`fail_open=True`): actions whose limit is not what bounds guessing,
  i.e. redeeming a scanned 256-bit secret and opening a mobile session (an
  account has one live session whatever the limit says), go ahead
  uncounted, so a phone still pairs by QR code while Redis is away.

Both are logged as `event=rate_limit_unavailable` with the policy applied.
"""

import contextlib
import ipaddress
import logging
import math
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.cache import DEFAULT_CACHE_ALIAS, cache, caches
from django.core.cache.backends.redis import RedisCache
from redis.exceptions import RedisError

logger = logging.getLogger("archipelag.ratelimit")

# What Django's Redis cache raises when Redis is down, refuses a write (out
# of memory) or times out: redis-py wraps socket errors in these.
CACHE_ERRORS: tuple[type[Exception], ...] = (RedisError,)
# What a refused caller is told to wait: a Redis restart takes seconds.
UNAVAILABLE_RETRY_AFTER = 30


@dataclass(frozen=True)
class Limit:
    name: str
    max_hits: int
    period_seconds: int
    # Whose attempts it counts, for messages: "this address", "all Islands".
    per: str = ""

    def describe(self) -> str:
        return f"{self.max_hits} per {_period_words(self.period_seconds)}"


class Unavailable(Exception):
    """The counters cannot be read or written, and the action may not go ahead uncounted."""

    retry_after = UNAVAILABLE_RETRY_AFTER

    @property
    def wait_words(self) -> str:
        return wait_words(self.retry_after)


class RateLimited(Exception):
    def __init__(self, limit: Limit, retry_after: int):
        super().__init__(f"rate limited: {limit.describe()}")
        self.limit = limit
        self.retry_after = retry_after

    @property
    def wait_words(self) -> str:
        return wait_words(self.retry_after)


type Bucket = tuple[Limit, str]


def network_of(ip: str) -> str:
    """The network an address is counted with: its /24 for IPv4, its /56 for IPv6.

    One customer or cloud tenant usually holds a whole /24 or /56, so a
    per-network counter stops a guesser from renting neighbouring
    addresses. Anything unparsable is its own network.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 56
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def _period_words(seconds: int) -> str:
    if seconds % 86400 == 0:
        return "day" if seconds == 86400 else f"{seconds // 86400} days"
    if seconds % 3600 == 0:
        return "hour" if seconds == 3600 else f"{seconds // 3600} hours"
    return f"{seconds // 60} minutes"


def wait_words(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = math.ceil(seconds / 60)
    if minutes < 120:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{math.ceil(minutes / 60)} hours"


def _window(limit: Limit, now: datetime) -> tuple[str, int]:
    stamp = now.timestamp()
    index = int(stamp // limit.period_seconds)
    retry_after = max(1, math.ceil((index + 1) * limit.period_seconds - stamp))
    return str(index), retry_after


def _key(limit: Limit, ident: str, window: str) -> str:
    return f"rl:{limit.name}:{ident}:{window}"


def _unavailable(buckets: list[Bucket], exc: Exception, fail_open: bool) -> None:
    """Log that the counters are out of reach; raise Unavailable unless the action fails open."""
    logger.warning(
        "event=rate_limit_unavailable policy=%s limits=%s error=%s",
        "open" if fail_open else "closed",
        ",".join(sorted({limit.name for limit, _ in buckets})),
        type(exc).__name__,
    )
    if not fail_open:
        raise Unavailable from exc


@dataclass(frozen=True)
class Attempt:
    """The counters one allowed attempt went into, for `refund()`."""

    keys: tuple[str, ...] = ()


# One round trip, atomic in Redis: count the attempt in every bucket (a new
# counter gets its expiry in the same step), and if any bucket went past
# its limit, take the attempt back out of all of them. The counts it
# returns are the ones the attempt saw, which decide.
_ATTEMPT_SCRIPT = """
local counts = {}
local over = false
for i, key in ipairs(KEYS) do
    local n = redis.call('INCR', key)
    if n == 1 then redis.call('EXPIRE', key, ARGV[2 * i]) end
    counts[i] = n
    if n > tonumber(ARGV[2 * i - 1]) then over = true end
end
if over then
    for _, key in ipairs(KEYS) do redis.call('DECR', key) end
end
return counts
"""
_REFUND_SCRIPT = """
for _, key in ipairs(KEYS) do
    if redis.call('EXISTS', key) == 1 then redis.call('DECR', key) end
end
return 0
"""
# Other caches (local memory with the embedded default) have no scripts: a
# lock makes the same increment-then-decide step atomic among this
# process's threads, which is all that shares a local-memory cache.
_local_lock = threading.Lock()


def _redis_client() -> Any:
    """The redis-py client behind Django's Redis cache, or None for other caches.

    `cache` is a proxy to the default cache, so the backend's own class is
    what tells (the proxy's class never names Redis).
    """
    backend = caches[DEFAULT_CACHE_ALIAS]
    if not isinstance(backend, RedisCache):
        return None
    return backend._cache.get_client(write=True)


def _count(keys: list[str], maxima: list[int], timeouts: list[int]) -> list[int]:
    client = _redis_client()
    if client is not None:
        raw_keys = [cache.make_and_validate_key(key) for key in keys]
        args: list[int] = []
        for max_hits, timeout in zip(maxima, timeouts, strict=True):
            args += [max_hits, timeout]
        return [int(n) for n in client.eval(_ATTEMPT_SCRIPT, len(raw_keys), *raw_keys, *args)]
    with _local_lock:
        counts = []
        for key, timeout in zip(keys, timeouts, strict=True):
            if cache.add(key, 1, timeout=timeout):
                counts.append(1)
            else:
                try:
                    counts.append(cache.incr(key))
                except ValueError:
                    # Expired between add() and incr(): this attempt starts it again.
                    cache.set(key, 1, timeout=timeout)
                    counts.append(1)
        if any(n > max_hits for n, max_hits in zip(counts, maxima, strict=True)):
            _uncount(keys)
        return counts


def _uncount(keys: list[str] | tuple[str, ...]) -> None:
    client = _redis_client()
    if client is not None:
        raw_keys = [cache.make_and_validate_key(key) for key in keys]
        client.eval(_REFUND_SCRIPT, len(raw_keys), *raw_keys)
        return
    for key in keys:
        # A key that expired meanwhile has nothing left to take back.
        with contextlib.suppress(ValueError):
            cache.decr(key)


def attempt(buckets: list[Bucket], now: datetime, *, fail_open: bool = False) -> Attempt:
    """Count one attempt in every bucket; the counts decide whether it may go ahead.

    Counting first is what makes a limit hold under concurrency: of any
    number of simultaneous attempts, at most `max_hits` see a count within
    the limit. A refused attempt is taken back out of every bucket, so
    refusals do not extend a lockout, and raises RateLimited with the
    longest wait among the full buckets. Where only failures count, call
    `refund()` with the result when the attempt succeeds.

    Raises Unavailable when the counters cannot be reached, unless
    `fail_open`, which lets the attempt go ahead uncounted.
    """
    keys: list[str] = []
    maxima: list[int] = []
    timeouts: list[int] = []
    waits: list[int] = []
    for limit, ident in buckets:
        window, retry_after = _window(limit, now)
        keys.append(_key(limit, ident, window))
        maxima.append(limit.max_hits)
        timeouts.append(retry_after + 60)
        waits.append(retry_after)
    try:
        counts = _count(keys, maxima, timeouts)
    except CACHE_ERRORS as exc:
        _unavailable(buckets, exc, fail_open)
        return Attempt()
    full = [
        (retry_after, limit)
        for (limit, _), n, retry_after in zip(buckets, counts, waits, strict=True)
        if n > limit.max_hits
    ]
    if full:
        retry_after, limit = max(full, key=lambda item: item[0])
        raise RateLimited(limit, retry_after)
    return Attempt(tuple(keys))


def refund(counted: Attempt) -> None:
    """Take a successful attempt back out of its counters, where only failures count.

    Best effort: if Redis is away, the attempt stays counted, which errs
    towards the limit.
    """
    if not counted.keys:
        return
    try:
        _uncount(counted.keys)
    except CACHE_ERRORS as exc:
        logger.warning("event=rate_limit_refund_failed error=%s", type(exc).__name__)


def take(buckets: list[Bucket], now: datetime, *, fail_open: bool = False) -> None:
    """Count an attempt that costs something whatever its outcome (sending an email).

    The same atomic count-first step as `attempt()`, never refunded.
    """
    attempt(buckets, now, fail_open=fail_open)
