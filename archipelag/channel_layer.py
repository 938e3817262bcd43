"""channels-redis's layer with a Redis pool that waits for a connection when full.

channels-redis builds a plain redis-py `ConnectionPool`, which raises
`MaxConnectionsError` ("Too many connections") the moment every connection
is in use. However large the pool, a mass disconnect reaches that point: when
10,000 idle pairing sockets close at once (a load balancer restart, a network
blip), each consumer's `group_discard` wants a connection at the same moment,
and most of them fail with a traceback, leaving dead channels in their
groups until those expire (bench.websockets showed 7,835 such failures on a
quiet machine with a pool of 2,000).

A `BlockingConnectionPool` of the same size makes the surplus wait its turn
for up to `pool_timeout` seconds instead; Redis answers each command in
microseconds, so the queue drains quickly.

Its connections retry a command once, on a new connection, when the one
they held turns out to be closed: after a Redis restart every pooled
connection is dead. redis-py checks a pooled connection for a pending EOF
before handing it out, but not with every parser (RESP3 with hiredis, the
default with hiredis installed since redis-py 8, does not recover), and a
connection can die between that check and its command; without the retry
about 10% of the websocket handshakes after a restart failed with 1011
(tests/faults/test_redis_restart.py). Timeouts are not retried: a frozen
Redis must fail in one socket timeout, not two.

`send_to_groups` sends live page updates from `transaction.on_commit`.
"""

import asyncio
from collections.abc import Mapping
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels_redis.core import RedisChannelLayer as BaseRedisChannelLayer
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

# How long a layer operation waits for a free connection before giving up.
DEFAULT_POOL_TIMEOUT = 10.0


class RedisChannelLayer(BaseRedisChannelLayer):
    def create_pool(self, index: int) -> Any:
        host = dict(self.hosts[index])
        if "address" not in host:
            # Sentinel or host/port entries: channels-redis's own pool.
            return super().create_pool(index)
        address = host.pop("address")
        timeout = host.pop("pool_timeout", DEFAULT_POOL_TIMEOUT)
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        return BlockingConnectionPool.from_url(address, timeout=timeout, retry=retry, **host)


# How long a page-update send may hold up the request or step that caused it.
SEND_TIMEOUT = 2.0  # seconds


def send_to_groups(messages: Mapping[str, dict[str, Any]], timeout: float = SEND_TIMEOUT) -> None:
    """Send each message to its group, all at once, giving up after `timeout` seconds in all.

    For `transaction.on_commit(..., robust=True)` callbacks: live page updates
    are a nicety, so a channel layer that is down costs the caller at most
    `timeout` (raising TimeoutError, which on_commit logs), never one wait
    per group.
    """
    if not messages:
        return

    async def send() -> None:
        layer = get_channel_layer()
        assert layer is not None  # settings always configure one
        sends = (layer.group_send(group, message) for group, message in messages.items())
        await asyncio.wait_for(asyncio.gather(*sends), timeout)

    async_to_sync(send)()
