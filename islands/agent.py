"""The wire formats of the real Island agent, as msgspec Structs.

Also the one body that is not the agent's: the dispatcher's job assignment.
Field names are verbatim from the agent (see docs/api.md). Unknown fields
are ignored and optional fields may be null or absent, because agents of
several versions talk to one coordinator. Bounds on numbers and strings keep
absurd values out of the database; a value outside them is a 400.
"""

import uuid
from typing import Annotated, Any, Literal

import msgspec

from archipelag.api import NO_NUL_PATTERN

# The agent's host_id is a UUIDv4, but a config key may override it with
# any string of at least 8 characters. This keeps it safe to show, log and
# use in a NATS subject. Every pattern ends in \Z, not $: msgspec searches
# with re, where $ also matches before a trailing newline, so "$" let
# "host-0001\n" through into the database and the logs.
HOST_ID_PATTERN = r"^[A-Za-z0-9._-]{8,64}\Z"
HostId = Annotated[str, msgspec.Meta(pattern=HOST_ID_PATTERN)]

# Free text the coordinator keeps (in columns, or in JSON columns).
ShortText = Annotated[str, msgspec.Meta(max_length=64, pattern=NO_NUL_PATTERN)]
Text = Annotated[str, msgspec.Meta(max_length=128, pattern=NO_NUL_PATTERN)]
Label = Annotated[str, msgspec.Meta(max_length=32, pattern=NO_NUL_PATTERN)]
Megabytes = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Cores = Annotated[int, msgspec.Meta(ge=0, le=65_536)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
# Unix milliseconds, as every agent timestamp is. The reference's own minimal
# example uses 100, so only the type and sign are checked, not plausibility.
Milliseconds = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
# Live readings (percentages, gigabytes, watts, degrees) arrive as integers or
# floats depending on the agent's Rust type; both are fine, absurd ones are not.
Reading = (
    Annotated[int, msgspec.Meta(ge=-(10**12), le=10**12)] | Annotated[float, msgspec.Meta(ge=-1e12, le=1e12)]
)
# Prices are decimal strings in credits ("2.0"), never floats.
Price = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,12}(\.[0-9]{1,8})?\Z")]
JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}\Z"
JobId = Annotated[str, msgspec.Meta(pattern=JOB_ID_PATTERN)]


class Capabilities(msgspec.Struct, omit_defaults=True, gc=False):
    """Hardware an Island reports: at registration, with a pairing request, in a heartbeat.

    The agent sends the first five (RegisterHost's `capabilities`). The rest
    are the coordinator's own extension: phones report them when pairing and
    in heartbeats, and the simulator restates its hardware in heartbeats.
    Every bound here is the bound of the Island column it lands in, so no
    value needs cutting down on the way.
    """

    gpu_model: Text | None = None
    gpu_vram_mb: Megabytes | None = None
    cpu_cores: Cores | None = None
    ram_mb: Megabytes | None = None
    region: ShortText | None = None
    device_model: Text | None = None
    os_version: ShortText | None = None
    runtime: Label | None = None
    accelerator: Label | None = None

    def island_fields(self) -> dict[str, Any]:
        """The Island columns this report sets. What it leaves out, null or empty, keeps its value."""
        fields: dict[str, Any] = {}
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if value is None or value == "":
                continue
            fields[name] = value.lower() if name == "accelerator" else value
        return fields


class HostRegistration(msgspec.Struct):
    """What a host says about itself: the same body on three doors.

    POST /api/v1/islands/pairing, `coordinator.hosts.pairing` (the agent's
    PairingRequest, which carries only `host_id`) and
    `coordinator.hosts.register` (its RegisterHost).
    """

    host_id: HostId
    capabilities: Capabilities | None = None
    version: ShortText | None = None


class PollRequest(msgspec.Struct):
    host_id: HostId
    device_secret: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


# --- Heartbeats (`host.{host_id}.heartbeat`, POST /api/v1/islands/heartbeat) ---

# A heartbeat from a big server (many GPUs, many running jobs) is a few KiB;
# four times the usual body limit leaves room without inviting abuse.
HEARTBEAT_MAX_BODY_BYTES = 64 * 1024
#
# The structs declare only what the coordinator keeps. Everything else the
# agent sends (`cache`, most of `performance_estimates`) is skipped unread.
# `omit_defaults` keeps the stored metrics free of nulls. `gc=False`: these
# hold only scalars, lists and dicts, never a cycle, so the garbage collector
# need not walk the tens of thousands a NATS bridge holds between writes.


class SystemMetrics(msgspec.Struct, omit_defaults=True, gc=False):
    cpu_percent: Reading | None = None
    memory_used_mb: Megabytes | None = None
    memory_total_mb: Megabytes | None = None
    disk_used_gb: Reading | None = None
    disk_total_gb: Reading | None = None


class GpuMetrics(msgspec.Struct, omit_defaults=True, gc=False):
    index: Annotated[int, msgspec.Meta(ge=0, le=1024)] | None = None
    utilization_percent: Reading | None = None
    memory_used_mb: Megabytes | None = None
    memory_total_mb: Megabytes | None = None
    temperature_c: Reading | None = None
    power_draw_w: Reading | None = None


class ActiveJobMetrics(msgspec.Struct, omit_defaults=True, gc=False):
    job_id: Text | None = None
    job_type: Text | None = None
    duration_ms: Count | None = None
    tokens_generated: Count | None = None
    memory_mb: Megabytes | None = None
    gpu_memory_mb: Megabytes | None = None


class PerformanceEstimates(msgspec.Struct, gc=False):
    supported_runtimes: Annotated[list[ShortText], msgspec.Meta(max_length=32)] | None = None


class EnhancedHeartbeat(msgspec.Struct, gc=False):
    """The agent's heartbeat. Every field may be null or absent.

    `status` is "online" from every current agent; "offline" is a graceful
    sign-off. Any other value counts as online, so a future agent that adds
    states does not knock its Islands offline.
    """

    host_id: HostId | None = None
    status: ShortText | None = None
    active_jobs: Count | None = None
    timestamp: Milliseconds | None = None
    agent_version: ShortText | None = None
    system: SystemMetrics | None = None
    gpus: Annotated[list[GpuMetrics], msgspec.Meta(max_length=64)] | None = None
    active_job_metrics: Annotated[list[ActiveJobMetrics], msgspec.Meta(max_length=256)] | None = None
    performance_estimates: PerformanceEstimates | None = None
    asking_prices: Annotated[dict[ShortText, Price], msgspec.Meta(max_length=128)] | None = None
    # Not sent by the desktop agent; see Capabilities.
    capabilities: Capabilities | None = None

    @property
    def signs_off(self) -> bool:
        return self.status == "offline"

    def metrics(self) -> dict[str, Any]:
        """The live metrics kept on the Island: bounded by the struct's limits."""
        return {
            "active_jobs": self.active_jobs or 0,
            "timestamp": self.timestamp,
            "system": msgspec.to_builtins(self.system) if self.system else None,
            "gpus": msgspec.to_builtins(self.gpus or []),
            "active_job_metrics": msgspec.to_builtins(self.active_job_metrics or []),
        }


# --- Job status (`host.{host_id}.status`, POST /api/v1/islands/jobs/<job_id>/status) ---

type ReportedJobState = Literal["started", "streaming", "succeeded", "failed", "cancelled"]


class JobStatus(msgspec.Struct):
    """A job's state as the agent reports it; `job_id` is in the URL over HTTP."""

    state: ReportedJobState
    job_id: JobId | None = None
    # Unbounded here: the body limit bounds it, and the ledger keeps a prefix
    # (with any NUL replaced). A terminal status refused for its error text
    # would be retried forever.
    error: str | None = None
    timestamp: Milliseconds | None = None


class LeaseRenewal(msgspec.Struct):
    """Body of `host.{host_id}.lease`: the agent asks for 60 more seconds every 30 s."""

    job_id: JobId
    extend_seconds: Annotated[float, msgspec.Meta(ge=0, le=7 * 24 * 3600)]


# --- The dispatcher's side (POST /api/v1/jobs) -----------------------------------


class JobAssignment(msgspec.Struct):
    """The dispatcher records a job it gave an Island. `credits` is a decimal string or number.

    Not decoded as a Decimal: Decimal() also reads "2_5" as 25, " 2.5\n",
    "1e3" and digits of other scripts, and an amount of money is no place
    for that leniency. The view checks the text and converts it.
    """

    job_id: JobId
    island_id: uuid.UUID
    workload: Text
    credits: str | int | float
    lease_seconds: Annotated[int, msgspec.Meta(ge=1, le=7 * 24 * 3600)]


# The agent's full EnhancedHeartbeat, verbatim from the agent reference: the
# shape tests and benchmarks start from, and what docs/api.md shows.
REFERENCE_HEARTBEAT: dict[str, Any] = {
    "host_id": "550e8400-e29b-41d4-a716-446655440000",
    "status": "online",
    "active_jobs": 1,
    "timestamp": 1710000000000,
    "agent_version": "0.4.0",
    "system": {
        "cpu_percent": 45.5,
        "memory_used_mb": 8192,
        "memory_total_mb": 32768,
        "disk_used_gb": 100,
        "disk_total_gb": 500,
    },
    "gpus": [
        {
            "index": 0,
            "utilization_percent": 80,
            "memory_used_mb": 12000,
            "memory_total_mb": 24576,
            "temperature_c": 72,
            "power_draw_w": 280.5,
        }
    ],
    "active_job_metrics": [
        {
            "job_id": "j1",
            "job_type": "llm-chat",
            "duration_ms": 5000,
            "tokens_generated": 150,
            "memory_mb": 4096,
            "gpu_memory_mb": 8000,
        }
    ],
    "cache": {
        "cached_image_count": 3,
        "cached_size_mb": 15000,
        "warm_workload_count": 2,
        "warm_workload_ids": ["w1", "w2"],
    },
    "performance_estimates": {
        "gpu_bandwidth_gb_s": 1008.0,
        "estimated_llm_tok_s": 45.0,
        "max_concurrent_containers": 4,
        "wasm_memory_limit_mb": 256,
        "supported_runtimes": ["container", "wasm"],
        "nats_rtt_ms": 12.5,
        "public_addr": "1.2.3.4:5678",
    },
    "asking_prices": {"llm-chat": "2.0", "_default": "1.0"},
}
