"""Registrations of hosts not linked yet, kept for the code each is about to ask for.

Over NATS the agent registers (`coordinator.hosts.register`) and asks for a
code (`coordinator.hosts.pairing`) seconds apart, on two subjects that
several bridges may handle in either order, so a registration from a host
that is not linked is kept for REGISTRATION_TTL in the shared cache.

Anyone on NATS can make host ids up, so what they can hold is bounded:
at most NATS_PENDING_REGISTRATIONS_MAX, the oldest dropped first. On Redis
they sit in one hash with a sorted set of when each arrived, trimmed by
age and count in the same script that adds one (before, every made-up host
left a key for an hour: 50,000 of them took 26 MB). The local-memory cache
of the embedded default is bounded by its own MAX_ENTRIES, least recently
used first.
"""

import time
from datetime import timedelta
from typing import Any

import msgspec
from django.conf import settings
from django.core.cache import cache, caches
from django.core.cache.backends.redis import RedisCache

from islands.agent import HostRegistration

REGISTRATION_TTL = timedelta(hours=1)

_DATA = "nats-pending-registrations:data"
_ORDER = "nats-pending-registrations:order"

# KEYS: the hash (host id -> registration) and the sorted set (host id ->
# arrival, in ms). ARGV: host id, registration, now (ms), ttl (ms), most.
# Returns how many were dropped for want of room.
_PUT_SCRIPT = """
local now, ttl, most = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
for _, host in ipairs(stale) do redis.call('HDEL', KEYS[1], host) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
local dropped = 0
local extra = redis.call('ZCARD', KEYS[2]) - most
if extra > 0 then
    local oldest = redis.call('ZPOPMIN', KEYS[2], extra)
    for i = 1, #oldest, 2 do redis.call('HDEL', KEYS[1], oldest[i]) end
    dropped = extra
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return dropped
"""


def redis_client() -> Any:
    """The redis-py client behind the default cache, or None when it is not Redis."""
    backend = caches["default"]
    if not isinstance(backend, RedisCache):
        return None
    return backend._cache.get_client(write=True)


def _ttl_ms() -> int:
    return int(REGISTRATION_TTL.total_seconds() * 1000)


def keep(registration: HostRegistration) -> int:
    """Keep a host's registration for its coming pairing request; returns how many older ones were dropped."""
    data = msgspec.json.encode(registration)
    client = redis_client()
    if client is None:
        cache.set(_key(registration.host_id), data, timeout=int(REGISTRATION_TTL.total_seconds()))
        return 0
    keys = [cache.make_and_validate_key(_DATA), cache.make_and_validate_key(_ORDER)]
    now_ms = int(time.time() * 1000)
    most = max(1, settings.NATS_PENDING_REGISTRATIONS_MAX)
    return int(client.eval(_PUT_SCRIPT, 2, *keys, registration.host_id, data, now_ms, _ttl_ms(), most))


def find(host_id: str) -> HostRegistration | None:
    """What the host registered with lately, if it is still kept."""
    client = redis_client()
    if client is None:
        raw = cache.get(_key(host_id))
    else:
        pipe = client.pipeline(transaction=False)
        pipe.hget(cache.make_and_validate_key(_DATA), host_id)
        pipe.zscore(cache.make_and_validate_key(_ORDER), host_id)
        raw, arrived = pipe.execute()
        if raw is None or arrived is None or arrived < time.time() * 1000 - _ttl_ms():
            return None
    return None if raw is None else msgspec.json.decode(raw, type=HostRegistration)


def count() -> int:
    """How many are kept (on Redis; the local-memory cache does not say)."""
    client = redis_client()
    return 0 if client is None else int(client.zcard(cache.make_and_validate_key(_ORDER)))


def _key(host_id: str) -> str:
    return f"nats-register:{host_id}"
