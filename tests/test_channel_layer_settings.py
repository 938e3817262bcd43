"""The channels-redis pool is configured against the two failures bench.websockets shows.

With redis-py's defaults, a burst of websocket handshakes exhausts a pool
of 100 connections (MaxConnectionsError), and a 5 s socket timeout races
channels-redis's 5 s blocking pop ("Timeout reading", close 1011). See
docs/performance.md; `python -m bench.websockets --redis-defaults` shows both.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# Builds the layer's pool exactly as channels-redis does, without connecting.
PROBE = """
import json, django
django.setup()
from channels.layers import get_channel_layer
from channels_redis.utils import create_pool
layer = get_channel_layer()
pool = create_pool(layer.hosts[0])
connection = pool.make_connection()  # not connected: only its settings are read
print(json.dumps({
    "backend": type(layer).__name__,
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
    assert pool["backend"] == "RedisChannelLayer"
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
    assert pool["max_connections"] == 100
    assert pool["socket_timeout"] == pool["blocking_pop"] == 5
