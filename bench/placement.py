"""Placement: drawing an Island for a job among 10,000 online ones, in process and over HTTP.

In this process, on the bench database (PostgreSQL): placements through
Job.objects.submit (the draw, the slot, the job, its attempt), next to the
same number of bare job INSERTs (Job.objects.create, autocommit) in the same
run, interleaved round by round. Over HTTP, on one daphne: POST /api/v1/jobs
next to GET /api/v1/ping, interleaved, from concurrent keep-alive clients.

Targets (docs/performance.md): at least 1,000 placements/s and at least 0.25
of the bare-INSERT rate; submissions over HTTP at least 0.7 of ping.

    python -m bench.placement [--islands 10000] [--placements 2000] [--rounds 3] [--profile FILE]

--profile samples daphne with py-spy during one more submission round and
prints where its CPU went.
"""

import argparse
import asyncio
import itertools
import json
import random
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench import common

TARGET_RATE = 1000.0
TARGET_INSERT_RATIO = 0.25
TARGET_HTTP_RATIO = 0.7
_ids = itertools.count()


def seed(count: int) -> Any:
    from datetime import timedelta

    from django.contrib.auth.models import User
    from django.utils import timezone

    from islands.models import DispatcherKey, Island

    now = timezone.now()
    owner = User.objects.create_user("placement-owner")
    rng = random.Random(1)
    Island.objects.bulk_create(
        (
            Island(
                owner=owner,
                host_id=f"placement-{n:06d}",
                name=f"Island {n}",
                status=Island.Status.ONLINE,
                last_heartbeat_at=now,
                # Online for the whole run, as heartbeats every 10 s would keep them.
                offline_after=now + timedelta(hours=2),
                capacity=1_000_000,
                karma=Decimal(rng.randint(25, 100)),
                gpu_vram_mb=24576,
                supported_runtimes=["container", "wasm"],
                asking_prices={"llm-chat": "1.5", "_default": "1.0"} if n % 3 == 0 else {},
            )
            for n in range(count)
        ),
        batch_size=2000,
    )
    # Every new Island's turn is behind the clock: give them turns, as the watcher does.
    Island.objects.refresh_turns(random.Random(2))
    return DispatcherKey.objects.issue("bench dispatcher")[1]


def spec() -> Any:
    from datetime import timedelta

    from islands.models import JobSpec

    return JobSpec(
        job_id=f"placed-{next(_ids):07d}",
        workload="llm-chat",
        lease=timedelta(minutes=5),
        budget=Decimal("2.5"),
        input={"prompt": "Hello"},
        artefacts={"container_image": "registry.example.com/llm-chat:latest"},
    )


def place(count: int, rng: random.Random) -> float:
    from islands.models import Job

    started = time.perf_counter()
    for _ in range(count):
        Job.objects.submit(spec(), rng=rng)
    return count / (time.perf_counter() - started)


def insert(count: int, island_id: Any) -> float:
    """The floor: the same number of job rows, each one INSERT in autocommit, through the ORM."""
    from datetime import timedelta

    from django.utils import timezone

    from islands.models import Job

    started = time.perf_counter()
    for _ in range(count):
        now = timezone.now()
        Job.objects.create(
            job_id=f"bare-{next(_ids):07d}",
            island_id=island_id,
            workload="llm-chat",
            input={"prompt": "Hello"},
            artefacts={"container_image": "registry.example.com/llm-chat:latest"},
            budget=Decimal("2.5"),
            credits=Decimal(1),
            lease_seconds=300,
            assigned_at=now,
            lease_expires_at=now + timedelta(minutes=5),
        )
    return count / (time.perf_counter() - started)


async def hammer(
    url: str, method: str, key: str | None, seconds: float, clients: int
) -> tuple[int, list[float]]:
    import aiohttp

    done = 0
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def client(session: Any) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            started = time.perf_counter()
            if method == "GET":
                async with session.get(url) as response:
                    await response.read()
                    assert response.status == 200, response.status
            else:
                body = json.dumps(
                    {
                        "job_id": f"http-{next(_ids):07d}",
                        "workload": "llm-chat",
                        "input": {"prompt": "Hello"},
                        "budget": "2.5",
                        "lease_seconds": 300,
                        "container_image": "registry.example.com/llm-chat:latest",
                    }
                )
                headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    assert response.status == 201, (response.status, await response.text())
            latencies.append(time.perf_counter() - started)
            done += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return done, latencies


def rates(values: list[float]) -> str:
    return ", ".join(f"{value:,.0f}" for value in values)


def spread(latencies: list[float]) -> str:
    p50, p99 = common.percentile(latencies, 50), common.percentile(latencies, 99)
    return f"p50 {common.ms(p50)} ms, p99 {common.ms(p99)} ms"


def run(
    islands: int, placements: int, rounds: int, seconds: float, clients: int, profile: str | None = None
) -> bool:
    common.setup_django()
    with common.stage(f"seeding {islands:,} online Islands"):
        key = seed(islands)
    from islands.models import Island

    some_island = Island.objects.values_list("pk", flat=True).first()
    rng = random.Random(3)
    with common.stage("warming up"):
        place(50, rng)
        insert(50, some_island)
    placed_rates, insert_rates = [], []
    for _ in range(rounds):
        placed_rates.append(place(placements, rng))
        insert_rates.append(insert(placements, some_island))
    placed, inserted = common.median(placed_rates), common.median(insert_rates)
    ratio = placed / inserted
    table = common.Table(
        f"Placement among {islands:,} online Islands ({rounds} interleaved rounds of {placements:,})",
        ["measure", "per second (median)", "rounds"],
    )
    table.add("baseline: bare job INSERT (ORM, autocommit)", f"{inserted:,.0f}", rates(insert_rates))
    table.add("Job.objects.submit (draw, slot, job, attempt)", f"{placed:,.0f}", rates(placed_rates))
    in_process = placed >= TARGET_RATE and ratio >= TARGET_INSERT_RATIO
    table.note(
        f"placements / bare INSERTs = {ratio:.2f} (target ≥ {TARGET_INSERT_RATIO}); "
        f"placements ≥ {TARGET_RATE:,.0f}/s: {'PASS' if in_process else 'FAIL'}"
    )
    with common.Daphne(name="placement") as server:
        ping_url, jobs_url = f"{server.url}/api/v1/ping", f"{server.url}/api/v1/jobs"
        ping_counts, submit_counts = [], []
        ping_latencies: list[float] = []
        submit_latencies: list[float] = []
        ping_cpu = submit_cpu = 0.0  # the server's CPU seconds, over all rounds
        for _ in range(rounds):
            with common.CpuMeter(server.pid) as meter:
                done, latencies = asyncio.run(hammer(ping_url, "GET", None, seconds, clients))
            ping_counts.append(done / seconds)
            ping_latencies += latencies
            ping_cpu += meter.share.server_seconds / max(done, 1) / rounds
            with common.CpuMeter(server.pid) as meter:
                done, latencies = asyncio.run(hammer(jobs_url, "POST", key, seconds, clients))
            submit_counts.append(done / seconds)
            submit_latencies += latencies
            submit_cpu += meter.share.server_seconds / max(done, 1) / rounds
        if profile:
            with common.stage(f"profiling daphne with py-spy during a submission round into {profile}"):
                spy = common.py_spy(server.pid, seconds, profile)
                asyncio.run(hammer(jobs_url, "POST", key, seconds, clients))
                spy.wait()
    ping, submitted = common.median(ping_counts), common.median(submit_counts)
    http_ratio = submitted / ping
    table.add(
        f"baseline: GET /api/v1/ping over HTTP ({clients} clients)",
        f"{ping:,.0f}",
        spread(ping_latencies),
    )
    table.add(
        f"POST /api/v1/jobs over HTTP ({clients} clients)",
        f"{submitted:,.0f}",
        spread(submit_latencies),
    )
    over_http = http_ratio >= TARGET_HTTP_RATIO
    table.note(
        f"submissions / ping = {http_ratio:.2f} (target ≥ {TARGET_HTTP_RATIO}): "
        f"{'PASS' if over_http else 'FAIL'}; "
        f"the server's CPU per request: ping {ping_cpu * 1000:.2f} ms, submission {submit_cpu * 1000:.2f} ms "
        f"(ratio {ping_cpu / max(submit_cpu, 1e-9):.2f})"
    )
    table.note(common.machine_line())
    table.print()
    if profile and Path(profile).exists():
        print(common.summarize_profile(Path(profile), top=45), flush=True)
    return in_process and over_http


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--islands", type=int, default=10_000)
    parser.add_argument("--placements", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="per HTTP round and kind")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--profile", metavar="FILE", help="py-spy samples of daphne during submissions")
    args = parser.parse_args(argv)
    return run(args.islands, args.placements, args.rounds, args.seconds, args.clients, args.profile)


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
