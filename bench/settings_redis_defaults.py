"""archipelag.settings with the channel layer's Redis pool left at redis-py's defaults.

Only for `bench.websockets --redis-defaults`, which shows what the two
settings in archipelag/settings.py prevent: channels-redis's own layer with a
pool of 100 connections
(MaxConnectionsError under a burst of handshakes) and a 5 s socket timeout
that races channels-redis's 5 s BZPOPMIN ("Timeout reading", close 1011).
"""

from archipelag.settings import *  # noqa: F403
from archipelag.settings import CHANNEL_LAYERS

CHANNEL_LAYERS["default"]["BACKEND"] = "channels_redis.core.RedisChannelLayer"
_hosts: list[dict[str, object]] = CHANNEL_LAYERS["default"]["CONFIG"]["hosts"]  # type: ignore[index]
for _host in _hosts:
    for _name in ("max_connections", "pool_timeout", "socket_timeout", "socket_connect_timeout"):
        _host.pop(_name, None)
