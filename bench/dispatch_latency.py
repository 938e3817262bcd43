"""Submit → AssignJob received by an agent-shaped consumer, at a steady 20 submissions a second.

Everything as in production, on this machine: daphne serving the API with
production settings on the bench database (PostgreSQL), `manage.py
nats_bridge` on the same database, and the real NATS server (NATS_URL,
nats://127.0.0.1:4222 by default) with JetStream. The bridge and its stream
run under a subject prefix and a stream name of their own (deleted after).

1. Seeds `--islands` online NATS Islands (10,000). `--agents` of them (20)
   are in the region `bench-agents`; the jobs ask for that region, so every
   one is drawn among those, through the same rules and index as always,
   and each of those has an agent: a durable pull consumer `host-{id}`
   created as the agent's source creates it (filter host.{id}.jobs, explicit
   ack, max_deliver 5, ack_wait 60 s) that acks each message on receipt.
2. Submits jobs over HTTP (POST /api/v1/jobs with a dispatcher key, no
   island_id) at `--rate` a second for `--seconds`, each on schedule
   whether or not the previous one was answered, after an untimed warm-up.
   For each job: when the 201 came back, and when its agent received the
   AssignJob (both from this process's monotonic clock).
3. Baseline, in the same run: a raw JetStream publish (with a
   Nats-Msg-Id) into the same stream, received by the same kind of
   consumer, at the same rate: what NATS alone costs on the same path.

The figure is the time from the submit's answer to the AssignJob's
receipt (negative when the agent had it before the client read the 201).
Target: p99 at most 100 ms.

    BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/archipelag_bench_web \\
      python -m bench.dispatch_latency [--islands 10000] [--agents 20] [--rate 20] [--seconds 60]
                                       [--placement drawn|named]
"""

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bench import common

TARGET_P99 = 0.100  # seconds
REGION = "bench-agents"
NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")


@dataclass
class Timings:
    """Per job (or baseline message): when it went out, when it was answered, when an agent had it."""

    sent: dict[str, float] = field(default_factory=dict)
    answered: dict[str, float] = field(default_factory=dict)
    received: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def latencies(self, since: dict[str, float]) -> list[float]:
        return [self.received[key] - since[key] for key in since if key in self.received]


def seed(islands: int, agents: int) -> tuple[list[str], list[str], str]:
    """`islands` online NATS Islands, `agents` of them in REGION (their hosts and ids); a dispatcher key."""
    from datetime import timedelta

    from django.contrib.auth.models import User
    from django.utils import timezone

    from islands.models import DispatcherKey, Island

    owner = User.objects.create_user("bench-owner")
    now = timezone.now()
    hosts = [f"bench-host-{n:06d}" for n in range(islands)]
    Island.objects.bulk_create(
        [
            Island(
                owner=owner,
                host_id=host,
                name=f"Bench {host}",
                transport=Island.Transport.NATS,
                region=REGION if n < agents else "eu-west",
                gpu_model="RTX 4090",
                gpu_vram_mb=24576,
                cpu_cores=16,
                ram_mb=65536,
                status=Island.Status.ONLINE,
                last_heartbeat_at=now,
                # Online for the whole run without heartbeats: the run measures delivery.
                offline_after=now + timedelta(hours=6),
                runtimes=" container wasm ",
                # Room for every job of the run: the agents here take jobs and never report.
                capacity=100_000 if n < agents else 4,
            )
            for n, host in enumerate(hosts)
        ],
        batch_size=2000,
    )
    # What the watcher does: every Island gets its first turn in the draw.
    Island.objects.refresh_turns()
    _, key = DispatcherKey.objects.issue("bench dispatcher")
    with_agents = dict(Island.objects.filter(region=REGION).values_list("host_id", "pk"))
    return hosts[:agents], [str(with_agents[host]) for host in hosts[:agents]], key


class Bridge:
    """`manage.py nats_bridge` on the bench database, under a prefix of its own."""

    def __init__(self, prefix: str):
        self.log = common.workdir() / "nats-bridge.log"
        env = {**os.environ, **common.server_env(), "NATS_URL": NATS_URL, "LOG_LEVEL": "INFO"}
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "manage.py",
                    "nats_bridge",
                    "--subject-prefix",
                    prefix,
                    "--stats-interval",
                    "3600",
                ],
                cwd=common.BASE_DIR,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while "event=bridge_ready" not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                sys.exit(f"the bridge did not start:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> dict[str, int]:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        line = [line for line in self.output().splitlines() if "event=bridge_stopped " in line]
        return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line[-1])} if line else {}


class Agents:
    """One NATS connection holding each host's agent-shaped consumer, each pulling and acking on receipt."""

    def __init__(self, prefix: str, stream: str, hosts: list[str], into: dict[str, Timings]):
        self.prefix, self.stream, self.hosts, self.into = prefix, stream, hosts, into
        self.current = "warm-up"
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        import nats
        from nats.js.api import AckPolicy, ConsumerConfig
        from nats.js.errors import NotFoundError

        self.nc = await nats.connect(NATS_URL, name="bench-agents")
        jsm = self.nc.jsm()
        await jsm.stream_info(self.stream)  # the agent's get_stream
        for host in self.hosts:
            name = f"host-{host}"
            try:
                await jsm.consumer_info(self.stream, name)
            except NotFoundError:
                await jsm.add_consumer(
                    self.stream,
                    ConsumerConfig(
                        durable_name=name,
                        ack_policy=AckPolicy.EXPLICIT,
                        filter_subject=f"{self.prefix}host.{host}.jobs",
                        max_deliver=5,
                        ack_wait=60,
                    ),
                )
            self.tasks.append(asyncio.create_task(self._messages(name)))

    async def _messages(self, consumer: str, batch: int = 200, expires: float = 30.0) -> None:
        """What the agent's async-nats `consumer.messages()` does: keep a pull request waiting.

        A request for up to `batch` messages, expiring after `expires`
        seconds, stays at the server; another goes out once half of it has
        been delivered, or when it expires. (nats-py's fetch() asks anew on
        each call, which adds waits of up to a second the agent never has.)
        """
        inbox = self.nc.new_inbox()
        arrivals: asyncio.Queue[Any] = asyncio.Queue()
        await self.nc.subscribe(inbox, cb=arrivals.put)
        request = json.dumps(
            {"batch": batch, "expires": int(expires * 1e9), "idle_heartbeat": int(expires / 2 * 1e9)}
        ).encode()
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{consumer}"
        await self.nc.publish(next_subject, request, reply=inbox)
        owed = batch
        while True:
            message = await arrivals.get()
            status = (message.headers or {}).get("Status")
            if status == "100":
                continue  # an idle heartbeat
            if status:
                # 408: the request expired; 409: the server ended it. Ask again.
                await self.nc.publish(next_subject, request, reply=inbox)
                owed = batch
                continue
            at = time.perf_counter()
            await message.ack()  # on receipt, as the agent does
            self.into[self.current].received[json.loads(message.data)["job_id"]] = at
            owed -= 1
            if owed <= batch // 2:
                await self.nc.publish(next_subject, request, reply=inbox)
                owed += batch

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.nc.close()


def submission(job_id: str, island_id: str | None) -> bytes:
    return json.dumps(
        {
            "job_id": job_id,
            **({"island_id": island_id} if island_id else {}),
            "workload": "llm-chat",
            "runtime": "container",
            "input": {"prompt": "Hello", "max_tokens": 64},
            "budget": "5",
            "lease_seconds": 600,
            "requirements": {"region": REGION},
            "container_image": "registry.example.com/llm-chat:latest",
            "image_digest": "sha256:abcdef1234567890",
            "sandbox_tier": "standard",
        }
    ).encode()


async def submit_at_rate(
    url: str, key: str, tag: str, rate: float, seconds: float, into: Timings, islands: list[str] | None
) -> None:
    """POST a job every 1/rate s, on schedule (an open loop: a slow answer delays no later submission)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(job_id: str, island_id: str | None) -> None:
            into.sent[job_id] = time.perf_counter()
            body = submission(job_id, island_id)
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    outcome = str(response.status)
            except (TimeoutError, aiohttp.ClientError) as exc:
                outcome = type(exc).__name__
            if outcome == "201":
                into.answered[job_id] = time.perf_counter()
            else:
                into.errors[outcome] = into.errors.get(outcome, 0) + 1

        started = time.perf_counter()
        pending = []
        for n in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
            island_id = islands[n % len(islands)] if islands else None
            pending.append(asyncio.create_task(one(f"{tag}-{n:06d}", island_id)))
        await asyncio.gather(*pending)


async def publish_at_rate(prefix: str, hosts: list[str], rate: float, seconds: float, into: Timings) -> None:
    """The baseline: JetStream publishes with a Nats-Msg-Id into the same stream, on the same schedule."""
    import nats

    nc = await nats.connect(NATS_URL, name="bench-baseline")
    js = nc.jetstream()
    try:
        started = time.perf_counter()
        for n in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
            job_id = f"raw-{n:06d}"
            body = json.dumps({"job_id": job_id, "input": {}, "lease_expires": 0}).encode()
            into.sent[job_id] = time.perf_counter()
            await js.publish(
                f"{prefix}host.{hosts[n % len(hosts)]}.jobs", body, headers={"Nats-Msg-Id": f"{job_id}:1"}
            )
            into.answered[job_id] = time.perf_counter()
    finally:
        await nc.close()


async def measure(
    url: str,
    key: str,
    prefix: str,
    stream: str,
    hosts: list[str],
    rate: float,
    seconds: float,
    named: list[str] | None,
) -> dict[str, Timings]:
    timings = {name: Timings() for name in ("warm-up", "submit", "baseline")}
    agents = Agents(prefix, stream, hosts, timings)
    await agents.start()
    try:
        await submit_at_rate(url, key, "warm", rate, min(5.0, seconds), timings["warm-up"], named)
        await asyncio.sleep(1)
        agents.current = "submit"
        await submit_at_rate(url, key, "job", rate, seconds, timings["submit"], named)
        await asyncio.sleep(2)  # the last AssignJobs arrive
        agents.current = "baseline"
        await publish_at_rate(prefix, hosts, rate, min(seconds, 20.0), timings["baseline"])
        await asyncio.sleep(1)
    finally:
        await agents.stop()
    return timings


async def delete_stream(stream: str) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        await nc.jsm().delete_stream(stream)
    finally:
        await nc.close()


def row(table: common.Table, name: str, values: list[float], count: int) -> None:
    table.add(
        name,
        f"{len(values)}/{count}",
        common.ms(common.percentile(values, 50)),
        common.ms(common.percentile(values, 90)),
        common.ms(common.percentile(values, 99)),
        common.ms(max(values)) if values else "nan",
    )


def run(islands: int, agents: int, rate: float, seconds: float, placement: str) -> bool:
    if not common.port_open("127.0.0.1", 4222) and "127.0.0.1" in NATS_URL:
        sys.exit(f"needs NATS with JetStream at {NATS_URL}")
    load_before = common.machine_line()
    common.setup_django()
    from archipelag.nats import default_stream

    with common.stage(f"seeding {islands} online NATS Islands, {agents} with agents"):
        hosts, island_ids, key = seed(islands, agents)
    named = island_ids if placement == "named" else None
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    stream = default_stream(prefix)
    bridge = Bridge(prefix)
    try:
        with common.Daphne(name="dispatch") as server:
            with common.stage(f"submitting at {rate:g}/s for {seconds:g} s, then the raw baseline"):
                timings = asyncio.run(
                    measure(server.url + "/api/v1/jobs", key, prefix, stream, hosts, rate, seconds, named)
                )
            tracebacks = server.output().count("Traceback")
    finally:
        counters = bridge.stop()
        asyncio.run(delete_stream(stream))

    submit, baseline = timings["submit"], timings["baseline"]
    after_answer = submit.latencies(submit.answered)
    after_sent = submit.latencies(submit.sent)
    answers = [submit.answered[k] - submit.sent[k] for k in submit.answered]
    raw = baseline.latencies(baseline.sent)
    table = common.Table(
        f"Submit → AssignJob received: {rate:g} submissions/s for {seconds:g} s, "
        f"{islands} online Islands, {agents} agent-shaped consumers, "
        + ("each job drawn among them" if placement == "drawn" else "each job naming its Island"),
        ["measure", "received", "p50 ms", "p90 ms", "p99 ms", "max ms"],
    )
    count = len(submit.sent)
    row(table, "AssignJob received, after the submit's answer", after_answer, count)
    row(table, "AssignJob received, after the submit was sent", after_sent, count)
    row(table, "the submit's answer (201), after it was sent", answers, count)
    row(table, "baseline: raw JetStream publish → received", raw, len(baseline.sent))
    p99 = common.percentile(after_answer, 99)
    missing = sum(1 for job_id in submit.answered if job_id not in submit.received)
    passed = p99 <= TARGET_P99 and not submit.errors and not missing and not tracebacks
    table.note(
        f"p99 after the answer: {p99 * 1000:.1f} ms (target ≤ {TARGET_P99 * 1000:.0f} ms) "
        f"{'PASS' if passed else 'FAIL'}; p99 of the raw baseline {common.percentile(raw, 99) * 1000:.1f} ms"
    )
    table.note(
        f"submissions refused: {submit.errors or 0}; answered but never received: {missing}; "
        f"tracebacks in daphne's log: {tracebacks}"
    )
    shown = ("outbox_claimed", "outbox_sent", "outbox_failed", "outbox_duplicates", "outbox_listen_errors")
    table.note("bridge counters: " + " ".join(f"{name}={counters.get(name, 0)}" for name in shown))
    table.note(f"before: {load_before}")
    table.note(f"after:  {common.machine_line()}")
    table.print()
    return passed


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--islands", type=int, default=10_000)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--rate", type=float, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument(
        "--placement",
        choices=["drawn", "named"],
        default="drawn",
        help="drawn: the coordinator draws each job's Island (no island_id); "
        "named: each job names one (the explicit form), leaving the draw out of the path",
    )
    args = parser.parse_args(argv)
    return run(args.islands, args.agents, args.rate, args.seconds, args.placement)


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
