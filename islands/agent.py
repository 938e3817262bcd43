"""The wire formats of the real Island agent, as msgspec Structs.

Field names are verbatim from the agent (see docs/api.md). Unknown fields
are ignored and optional fields may be null or absent, because agents of
several versions talk to one coordinator. Bounds on numbers and strings keep
absurd values out of the database; a value outside them is a 400.
"""

from typing import Annotated

import msgspec

# The agent's host_id is a UUIDv4, but a config key may override it with
# any string of at least 8 characters. This keeps it safe to show, log and
# use in a NATS subject.
HOST_ID_PATTERN = r"^[A-Za-z0-9._-]{8,64}$"
HostId = Annotated[str, msgspec.Meta(pattern=HOST_ID_PATTERN)]

ShortText = Annotated[str, msgspec.Meta(max_length=64)]
Text = Annotated[str, msgspec.Meta(max_length=128)]
Megabytes = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Cores = Annotated[int, msgspec.Meta(ge=0, le=65_536)]


class Capabilities(msgspec.Struct):
    gpu_model: Text | None = None
    gpu_vram_mb: Megabytes | None = None
    cpu_cores: Cores | None = None
    ram_mb: Megabytes | None = None
    region: ShortText | None = None


class PairingRequest(msgspec.Struct):
    """Body of POST /api/v1/islands/pairing and of `coordinator.hosts.pairing`."""

    host_id: HostId
    capabilities: Capabilities | None = None
    version: ShortText | None = None


class RegisterHost(msgspec.Struct):
    """Body of `coordinator.hosts.register`."""

    host_id: HostId
    capabilities: Capabilities | None = None
    version: ShortText | None = None


class PollRequest(msgspec.Struct):
    host_id: HostId
    device_secret: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


def capabilities_dict(capabilities: Capabilities | None) -> dict[str, object]:
    if capabilities is None:
        return {}
    return {name: value for name, value in msgspec.structs.asdict(capabilities).items() if value is not None}
