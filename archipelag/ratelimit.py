"""Fixed-window counters in the shared cache, for anything guessable.

Counters live in Django's default cache: Redis in production, so every
process shares them and INCR keeps them exact under concurrency; local
memory with the embedded default. Windows are aligned to the clock
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

import logging
import math
from dataclasses import dataclass
from datetime import datetime

from django.core.cache import cache
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


def check(buckets: list[Bucket], now: datetime, *, fail_open: bool = False) -> None:
    """Raise RateLimited, with the longest wait, if any bucket is full.

    Raises Unavailable when the counters cannot be read, unless `fail_open`.
    """
    windows: dict[str, tuple[Limit, int]] = {}
    for limit, ident in buckets:
        window, retry_after = _window(limit, now)
        windows[_key(limit, ident, window)] = (limit, retry_after)
    try:
        counts = cache.get_many(list(windows))
    except CACHE_ERRORS as exc:
        _unavailable(buckets, exc, fail_open)
        return
    full = [
        (retry_after, limit)
        for key, (limit, retry_after) in windows.items()
        if int(counts.get(key, 0)) >= limit.max_hits
    ]
    if full:
        retry_after, limit = max(full, key=lambda item: item[0])
        raise RateLimited(limit, retry_after)


def hit(buckets: list[Bucket], now: datetime, *, fail_open: bool = False) -> None:
    """Count one attempt in every bucket.

    Raises Unavailable when it cannot be counted, unless `fail_open`: a
    Redis that answers reads but refuses writes (out of memory) must not
    let guesses through uncounted.
    """
    try:
        for limit, ident in buckets:
            window, retry_after = _window(limit, now)
            key = _key(limit, ident, window)
            # add() is a no-op when the key exists; incr() is atomic in Redis.
            cache.add(key, 0, timeout=retry_after + 60)
            try:
                cache.incr(key)
            except ValueError:
                # The key expired between add() and incr(); start it again.
                cache.add(key, 1, timeout=retry_after + 60)
    except CACHE_ERRORS as exc:
        _unavailable(buckets, exc, fail_open)


def check_and_hit(buckets: list[Bucket], now: datetime, *, fail_open: bool = False) -> None:
    """For actions counted whether or not they succeed (issuing codes)."""
    check(buckets, now, fail_open=fail_open)
    hit(buckets, now, fail_open=fail_open)


def take(buckets: list[Bucket], now: datetime, *, fail_open: bool = False) -> None:
    """Count first, then decide: raise RateLimited if any counter went past its limit.

    The atomic increment's result decides, so a burst of concurrent callers
    cannot all read "under the limit" before any of them counts (for
    actions that cost something whatever the outcome: sending an email).
    """
    over: list[tuple[int, Limit]] = []
    try:
        for limit, ident in buckets:
            window, retry_after = _window(limit, now)
            key = _key(limit, ident, window)
            cache.add(key, 0, timeout=retry_after + 60)
            try:
                count = cache.incr(key)
            except ValueError:
                cache.add(key, 1, timeout=retry_after + 60)
                count = 1
            if count > limit.max_hits:
                over.append((retry_after, limit))
    except CACHE_ERRORS as exc:
        _unavailable(buckets, exc, fail_open)
        return
    if over:
        retry_after, limit = max(over, key=lambda item: item[0])
        raise RateLimited(limit, retry_after)
