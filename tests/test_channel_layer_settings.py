"""The channels-redis pool is configured against the failures bench.websockets shows.

With redis-py's defaults, a burst of websocket handshakes exhausts a pool
of 100 connections (MaxConnectionsError), and a 5 s socket timeout races
channels-redis's 5 s blocking pop ("Timeout reading", close 1011). See
docs/performance.md; `python -m bench.websockets --redis-defaults` shows both.
A larger pool alone still fails when more sockets close at once than it
holds, so ours waits for a free connection instead of raising.
"""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from channels_redis.core import RedisChannelLayer as StockRedisChannelLayer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError

from archipelag.channel_layer import RedisChannelLayer

BASE_DIR = Path(__file__).resolve().parent.parent

# Builds the layer's pool exactly as channels-redis does, without connecting.
PROBE = """
import json, django
django.setup()
from channels.layers import get_channel_layer
layer = get_channel_layer()
pool = layer.create_pool(0)
connection = pool.make_connection()  # not connected: only its settings are read
print(json.dumps({
    "backend": type(layer).__module__ + "." + type(layer).__name__,
    "pool": type(pool).__name__,
    "pool_timeout": getattr(pool, "timeout", None),
    "blocking_pop": layer.brpop_timeout,
    "max_connections": pool.max_connections,
    "socket_timeout": connection.socket_timeout,
}))
"""


def layer_pool(**env: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=BASE_DIR,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "archipelag.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(json.loads(result.stdout))


def test_the_redis_layers_pool_outlasts_a_burst_and_the_blocking_pop():
    pool = layer_pool(REDIS_URL="redis://127.0.0.1:6379/0")
    assert pool["backend"] == "archipelag.channel_layer.RedisChannelLayer"
    assert pool["pool"] == "BlockingConnectionPool"
    assert pool["pool_timeout"] == 10
    assert pool["max_connections"] == 2000
    assert isinstance(pool["socket_timeout"], int | float)
    assert isinstance(pool["blocking_pop"], int | float)
    assert pool["socket_timeout"] > 2 * pool["blocking_pop"]


def test_the_pool_size_is_a_setting():
    assert (
        layer_pool(REDIS_URL="redis://127.0.0.1:6379/0", CHANNEL_LAYER_MAX_CONNECTIONS="500")[
            "max_connections"
        ]
        == 500
    )


def test_the_bench_settings_really_are_redis_pys_defaults():
    # What `bench.websockets --redis-defaults` runs with, so it shows the failures.
    pool = layer_pool(
        REDIS_URL="redis://127.0.0.1:6379/0", DJANGO_SETTINGS_MODULE="bench.settings_redis_defaults"
    )
    assert pool["backend"] == "channels_redis.core.RedisChannelLayer"
    assert pool["pool"] == "ConnectionPool"
    assert pool["max_connections"] == 100
    assert pool["socket_timeout"] == pool["blocking_pop"] == 5


async def _disconnect_storm(layer: StockRedisChannelLayer, sockets: int) -> None:
    # What `sockets` pairing consumers do when they all close at once.
    channels = [f"storm.{n}" for n in range(sockets)]
    await asyncio.gather(*(layer.group_add(f"storm-{n % 50}", name) for n, name in enumerate(channels)))
    await asyncio.gather(*(layer.group_discard(f"storm-{n % 50}", name) for n, name in enumerate(channels)))
    await layer.flush()


def test_a_disconnect_storm_larger_than_the_pool_waits_for_connections(redis_url: str):
    host = {"address": redis_url, "max_connections": 5, "socket_timeout": 30}
    # channels-redis's own pool raises once 5 operations are in flight...
    with pytest.raises(MaxConnectionsError):
        asyncio.run(_disconnect_storm(StockRedisChannelLayer(hosts=[dict(host)], prefix="storm-a"), 300))
    # ...ours queues the surplus, and every one of the 300 gets through.
    layer = RedisChannelLayer(hosts=[{**host, "pool_timeout": 10}], prefix="storm-b")
    asyncio.run(_disconnect_storm(layer, 300))


def test_a_full_pool_gives_up_after_its_timeout(redis_url: str):
    layer = RedisChannelLayer(hosts=[{"address": redis_url, "max_connections": 1, "pool_timeout": 0.2}])

    async def starve() -> None:
        pool = layer.create_pool(0)
        held = await pool.get_connection()
        try:
            with pytest.raises(RedisConnectionError, match="No connection available"):
                await pool.get_connection()
        finally:
            await pool.release(held)
            await pool.disconnect()

    asyncio.run(starve())
