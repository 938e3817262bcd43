"""The wire formats of the real Island agent, as msgspec Structs.

Also the one body that is not the agent's: the dispatcher's job assignment.
Field names are verbatim from the agent (see docs/api.md). Unknown fields
are ignored and optional fields may be null or absent, because agents of
several versions talk to one coordinator. Bounds on numbers and strings keep
absurd values out of the database; a value outside them is a 400.
"""

import uuid
from datetime import datetime
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
    # The device_secret of this device's earlier pairing request, whose code
    # the new one replaces (HTTP only; the agent's PairingRequest has none).
    device_secret: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None


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
    # How many jobs it runs at once: the agent's max(1, min(cores / 2, RAM / 2 GiB)).
    max_concurrent_containers: Annotated[int, msgspec.Meta(ge=0, le=4096)] | None = None


# A phone's thermal state, as iOS (ProcessInfo.ThermalState) and Android
# (PowerManager thermal status, mapped) name it. Work is taken only while it
# is nominal or fair.
type ThermalState = Literal["nominal", "fair", "serious", "critical"]


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
    # Phones: the coordinator's extension (docs/api.md). A phone takes work
    # only while charging or above 20 % battery, and thermally comfortable.
    battery_percent: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    charging: bool | None = None
    thermal_state: ThermalState | None = None

    @property
    def signs_off(self) -> bool:
        return self.status == "offline"

    @property
    def may_work(self) -> bool:
        """What this heartbeat says about taking work: only a phone's battery and heat say no."""
        if self.battery_percent is not None and self.battery_percent <= 20 and not self.charging:
            return False
        return self.thermal_state not in ("serious", "critical")

    def metrics(self) -> dict[str, Any]:
        """The live metrics kept on the Island: bounded by the struct's limits."""
        return {
            "active_jobs": self.active_jobs or 0,
            "timestamp": self.timestamp,
            "system": msgspec.to_builtins(self.system) if self.system else None,
            "gpus": msgspec.to_builtins(self.gpus or []),
            "active_job_metrics": msgspec.to_builtins(self.active_job_metrics or []),
            **{
                name: value
                for name in ("battery_percent", "charging", "thermal_state")
                if (value := getattr(self, name)) is not None
            },
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


class MaintenanceAnnouncement(msgspec.Struct, forbid_unknown_fields=True):
    """POST /api/v1/islands/maintenance: a window until this moment (ISO 8601, UTC), or null to end it.

    Not part of the agent's protocol: the Island's own scripts (an upgrade,
    a reboot) may call it with the Island's API token.
    """

    until: datetime | None


class LeaseRenewal(msgspec.Struct):
    """Body of `host.{host_id}.lease`: the agent asks for 60 more seconds every 30 s."""

    job_id: JobId
    extend_seconds: Annotated[float, msgspec.Meta(ge=0, le=7 * 24 * 3600)]


# --- The dispatcher's side (POST /api/v1/jobs) -----------------------------------


# The runtimes the agent knows (its AssignJob `runtime_type`), and phones' CoreML.
type Runtime = Literal["container", "wasm", "onnx", "llmcpp", "diffusers", "coreml"]
# A workload names what runs (its image, model or module), e.g. "llm-chat";
# Islands price by it (asking_prices), so it is a key of their JSON.
Workload = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")]
# Where an artefact comes from: an https or http URL, or what the agent takes
# instead (an OCI reference, a path it resolves); bounded and free of NUL.
Artefact = Annotated[str, msgspec.Meta(min_length=1, max_length=2048, pattern=NO_NUL_PATTERN)]
Digest = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=NO_NUL_PATTERN)]
TaskType = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL_PATTERN)]
# Credits as the dispatcher sends them: a decimal string or a JSON number.
# Not decoded as a Decimal: Decimal() also reads "2_5" as 25, " 2.5\n",
# "1e3" and digits of other scripts, and an amount of money is no place for
# that leniency. islands.views checks the text and converts it.
type Credits = str | int | float


class Requirements(msgspec.Struct, forbid_unknown_fields=True):
    """What an Island must have to take a job; each left out asks nothing."""

    min_vram_mb: Megabytes | None = None
    # Compared case-insensitively with the Island's region; never matches an
    # Island whose region is unknown or "auto".
    region: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL_PATTERN)] | None = None
    platform: Literal["desktop", "ios", "android"] | None = None


class Artefacts(msgspec.Struct, omit_defaults=True):
    """What the agent needs to run a job, under the agent's own names (its AssignJob)."""

    container_image: Artefact | None = None
    image_digest: Digest | None = None
    wasm_url: Artefact | None = None
    wasm_hash: Digest | None = None
    model_url: Artefact | None = None
    model_hash: Digest | None = None
    model_context_size: Annotated[int, msgspec.Meta(ge=1, le=2**32 - 1)] | None = None
    model_temperature: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    onnx_model_url: Artefact | None = None
    onnx_model_hash: Digest | None = None
    onnx_task_type: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL_PATTERN)] | None
    ) = None
    sandbox_tier: Literal["restricted", "standard", "elevated"] | None = None
    pipeline_config: dict[str, Any] | None = None
    expert_config: dict[str, Any] | None = None
    speculative_config: dict[str, Any] | None = None
    training_config: dict[str, Any] | None = None


# What each runtime cannot run without (the agent fails such a job on the
# Island, which would cost the Island karma for the dispatcher's mistake).
# A container job without an image runs the agent's default image.
RUNTIME_NEEDS: dict[str, str] = {
    "wasm": "wasm_url",
    "onnx": "onnx_model_url",
    "llmcpp": "model_url",
    "diffusers": "model_url",
    "coreml": "model_url",
}
ARTEFACT_FIELDS: tuple[str, ...] = Artefacts.__struct_fields__


class JobSubmission(Artefacts, kw_only=True):
    """Body of POST /api/v1/jobs: a job for the coordinator to place (or, with island_id, to give).

    The artefact fields (Artefacts) sit at the top level, as in the agent's
    AssignJob. `budget` is the most the job may pay; without an `island_id`
    it is required. With an `island_id`, `credits` (the older form) names the
    amount and is also the budget.
    """

    job_id: JobId
    workload: Workload
    lease_seconds: Annotated[int, msgspec.Meta(ge=1, le=7 * 24 * 3600)]
    runtime: Runtime = "container"
    # Any JSON; the view bounds its encoded size (JOB_INPUT_MAX_BYTES).
    input: Any = None
    budget: Credits | None = None
    requirements: Requirements | None = None
    island_id: uuid.UUID | None = None
    credits: Credits | None = None

    def artefacts(self) -> Artefacts:
        return Artefacts(**{name: getattr(self, name) for name in ARTEFACT_FIELDS})


# A job's input may be this large, encoded as JSON.
JOB_INPUT_MAX_BYTES = 64 * 1024
# The whole body: the input, the artefacts and the rest.
JOB_SUBMISSION_MAX_BYTES = 128 * 1024


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
