"""HTTP heartbeats at full speed, next to the trivial endpoint on the same server.

Many simulated Islands (each with its own token and host_id) send the real
agent's full EnhancedHeartbeat to POST /api/v1/islands/heartbeat over
keep-alive connections, as fast as one daphne process answers. The baseline,
measured in the same run on the same server, is POST /api/v1/ping with the
same headers and body: what Django, its middleware and daphne cost with no
database at all. Rounds alternate between the two so a neighbour's burst of
CPU hits both alike.

    python -m bench.heartbeats [--islands 1000] [--connections 64] [--seconds 8] [--rounds 3]
                               [--profile FILE | --no-profile]

Last, one more heartbeat round runs under py-spy (GIL-holding samples of
daphne), and the frames most often on the stack are printed: where the time
goes.
"""

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import common
from islands.agent import REFERENCE_HEARTBEAT

TARGET_RATIO = 0.8


@dataclass
class Round:
    name: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: dict[int, int] = field(default_factory=dict)
    cpu: list[common.CpuShare] = field(default_factory=list)
    per_round: list[float] = field(default_factory=list)
    # Request index -> when the latest request answered 200 was sent (wall clock).
    acknowledged: dict[int, float] = field(default_factory=dict)

    def ok(self) -> int:
        return len(self.latencies)

    def rate(self) -> float:
        return self.ok() / self.seconds if self.seconds else 0.0


def agent_heartbeat(host_id: str) -> bytes:
    """The real agent's full heartbeat (as in the agent reference), for this host."""
    return json.dumps(
        {**REFERENCE_HEARTBEAT, "host_id": host_id, "timestamp": int(time.time() * 1000)}
    ).encode()


def seed_islands(count: int) -> list[tuple[str, str]]:
    """`count` paired desktop Islands of one owner, online as if they had been beating.

    Returns (host_id, token) pairs. Online from the start, so the rounds
    measure the steady state (a beat that changes no status), not every
    Island's first heartbeat, which also records a status change.
    """
    from django.contrib.auth.models import User
    from django.utils import timezone

    from archipelag.secrets import generate_secret, hash_secret
    from islands.models import TOKEN_PREFIX, Island, offline_threshold

    owner = User.objects.create_user("bench-owner")
    now = timezone.now()
    pairs = [(f"bench-host-{i:06d}", TOKEN_PREFIX + generate_secret()) for i in range(count)]
    Island.objects.bulk_create(
        [
            Island(
                owner=owner,
                host_id=host_id,
                name=f"Bench {host_id}",
                gpu_model="RTX 4090",
                cpu_cores=16,
                ram_mb=65536,
                token_hash=hash_secret(token),
                status=Island.Status.ONLINE,
                last_heartbeat_at=now,
                offline_after=now + offline_threshold(),
            )
            for host_id, token in pairs
        ],
        batch_size=1000,
    )
    return pairs


async def drive(
    url: str, requests: list[tuple[dict[str, str], bytes]], connections: int, seconds: float, into: Round
) -> None:
    """Send `requests` round-robin over `connections` keep-alive connections for `seconds`."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.perf_counter() + seconds
        counter = iter(range(10**12))

        async def worker() -> None:
            while (now := time.perf_counter()) < deadline:
                index = next(counter) % len(requests)
                headers, body = requests[index]
                sent_at = time.time()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    elapsed = time.perf_counter() - now
                    if response.status == 200:
                        into.latencies.append(elapsed)
                        into.acknowledged[index] = sent_at
                    else:
                        into.errors[response.status] = into.errors.get(response.status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        into.seconds += time.perf_counter() - started


def run(islands: int, connections: int, seconds: float, rounds: int, profile: str | None = None) -> bool:
    common.setup_django()
    with common.stage(f"seeding {islands} Islands with tokens"):
        pairs = seed_islands(islands)
    requests = [
        ({"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, agent_heartbeat(host_id))
        for host_id, token in pairs
    ]
    endpoints = {"trivial": "/api/v1/ping", "heartbeat": "/api/v1/islands/heartbeat"}
    results = {name: Round(name) for name in endpoints}
    with common.Daphne(name="heartbeats") as server:
        with common.stage("warming up both endpoints"):
            for path in endpoints.values():
                asyncio.run(drive(server.url + path, requests, connections, 2, Round("warm-up")))
        for number in range(rounds):
            # Alternate which goes first, so a neighbour's load rising or
            # falling over the run weighs on both alike.
            order = list(endpoints.items()) if number % 2 == 0 else list(endpoints.items())[::-1]
            for name, path in order:
                result = results[name]
                done, spent = result.ok(), result.seconds
                with common.stage(f"round {number + 1}/{rounds}: {name}"), common.CpuMeter(server.pid) as cpu:
                    asyncio.run(drive(server.url + path, requests, connections, seconds, result))
                result.cpu.append(cpu.share)
                result.per_round.append((result.ok() - done) / (result.seconds - spent))
        if profile:
            with common.stage(f"profiling daphne with py-spy during a heartbeat round into {profile}"):
                spy = common.py_spy(server.pid, seconds, profile)
                url = server.url + endpoints["heartbeat"]
                asyncio.run(drive(url, requests, connections, seconds, Round("profile")))
                spy.wait()
        tracebacks = server.output().count("Traceback")

    unwritten = _unwritten(pairs, results["heartbeat"].acknowledged)
    trivial, heartbeat = results["trivial"], results["heartbeat"]
    ratio = heartbeat.rate() / trivial.rate() if trivial.rate() else 0.0
    cpu_ratio = cpu_per_request(trivial) / max(cpu_per_request(heartbeat), 1e-9)
    table = common.Table(
        f"HTTP heartbeats: {islands} Islands, {connections} connections, {rounds}×{seconds:g} s per endpoint",
        [
            "endpoint",
            "requests",
            "errors",
            "req/s",
            "p50 ms",
            "p99 ms",
            "server CPU ms/req",
            "server CPU",
            "client CPU",
            "others",
        ],
    )
    for result in (trivial, heartbeat):
        shares = result.cpu
        table.add(
            f"{result.name} ({endpoints[result.name]})",
            result.ok(),
            sum(result.errors.values()) or 0,
            f"{result.rate():.0f}",
            common.ms(common.percentile(result.latencies, 50)),
            common.ms(common.percentile(result.latencies, 99)),
            f"{cpu_per_request(result) * 1000:.2f}",
            *common.mean_share(shares).columns(),
        )
    passed = ratio >= TARGET_RATIO and not heartbeat.errors and not trivial.errors and not unwritten
    rounds_text = ", ".join(
        f"{name} {[round(rate) for rate in result.per_round]}" for name, result in results.items()
    )
    table.note(
        f"heartbeat / trivial throughput: {ratio:.2f} (target ≥ {TARGET_RATIO}) "
        f"{'PASS' if passed else 'FAIL'}; the same by server CPU per request: {cpu_ratio:.2f}; "
        f"req/s per round: {rounds_text}"
    )
    table.note(
        f"heartbeats answered 200 but not in the database: {unwritten} "
        f"(of {len(heartbeat.acknowledged)} Islands checked); tracebacks in the server log: {tracebacks}"
    )
    if heartbeat.errors or trivial.errors:
        table.note(f"errors by status: trivial {trivial.errors}, heartbeat {heartbeat.errors}")
    table.note(
        "CPU columns: percent of all cores during the rounds (server = daphne, client = this load generator)."
    )
    table.note(common.machine_line())
    table.print()
    if profile and Path(profile).exists():
        print(common.summarize_profile(Path(profile)), flush=True)
    elif profile:
        print("(no profile: py-spy could not attach to daphne; it needs ptrace permission)", flush=True)
    return passed


def cpu_per_request(result: Round) -> float:
    """Server CPU seconds per answered request: steadier than req/s when neighbours take CPU."""
    return common.mean_share(result.cpu).server_seconds / max(result.ok(), 1)


def _unwritten(pairs: list[tuple[str, str]], acknowledged: dict[int, float]) -> int:
    """Islands whose recorded heartbeat is older than the last one the server answered 200.

    A 200 means committed, so every Island's last_heartbeat_at (taken when the
    server received the beat) is at least when its last acknowledged beat was sent.
    """
    from datetime import UTC, datetime, timedelta

    from islands.models import Island

    recorded = dict(Island.objects.values_list("host_id", "last_heartbeat_at"))
    late = 0
    for index, sent_at in acknowledged.items():
        at = recorded[pairs[index][0]]
        # Both clocks are this machine's; allow for rounding to microseconds.
        if at is None or at < datetime.fromtimestamp(sent_at, UTC) - timedelta(milliseconds=1):
            late += 1
    return late


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--islands", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="where to keep the py-spy profile of an extra heartbeat round (collapsed stacks)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled round")
    args = parser.parse_args(argv)
    profile = None if args.no_profile else args.profile or str(common.workdir() / "heartbeat-profile.txt")
    return run(args.islands, args.connections, args.seconds, args.rounds, profile)


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
