"""HTTP heartbeats at full speed, next to Django's floor and the trivial endpoint.

Many simulated Islands (each with its own token and host_id) send the real
agent's full EnhancedHeartbeat to POST /api/v1/islands/heartbeat over
keep-alive connections, as fast as one daphne process answers. Two
baselines are measured in the same run with the same headers and bodies:
POST /api/v1/ping on the same server (the API's own request cycle, no
database), and POST /bare on a second daphne started alike, serving one
plain Django view with no middleware at all (bench/bare_asgi.py): what
Django on daphne costs with nothing in the way. Rounds rotate among the
three so a neighbour's burst of CPU hits all alike.

Targets: ping at least 0.9 and the heartbeat at least 0.8 of the bare view.

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
from typing import Any

from bench import common
from islands.agent import REFERENCE_HEARTBEAT

# Throughput next to the bare Django view's, on a daphne of its own.
TARGETS = {"ping": 0.9, "heartbeat": 0.8}


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
    url: str | list[str],
    requests: list[tuple[dict[str, str], bytes]],
    connections: int,
    seconds: float,
    into: Round,
) -> None:
    """Send `requests` round-robin over `connections` keep-alive connections for `seconds`.

    Given several URLs (servers), the connections are shared out among them evenly.
    """
    urls = [url] if isinstance(url, str) else url
    import aiohttp

    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.perf_counter() + seconds
        counter = iter(range(10**12))

        async def worker(url: str) -> None:
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
        await asyncio.gather(*(worker(urls[n % len(urls)]) for n in range(connections)))
        into.seconds += time.perf_counter() - started


def run(
    islands: int,
    connections: int,
    seconds: float,
    rounds: int,
    profile: str | None = None,
    scale: bool = False,
) -> bool:
    common.setup_django()
    with common.stage(f"seeding {islands} Islands with tokens"):
        pairs = seed_islands(islands)
    requests = [
        ({"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, agent_heartbeat(host_id))
        for host_id, token in pairs
    ]
    # Two daphne processes started alike, one loaded at a time: the bare
    # Django view on its own (bench/bare_asgi.py), and the application.
    with (
        common.Daphne(name="heartbeats") as server,
        common.Daphne(
            "bench.bare_asgi:application", name="bare", DJANGO_SETTINGS_MODULE="bench.bare_settings"
        ) as bare,
    ):
        endpoints = {
            "bare": Endpoint("bare Django view, no middleware", bare, "/bare"),
            "ping": Endpoint("ping", server, "/api/v1/ping"),
            "heartbeat": Endpoint("heartbeat", server, "/api/v1/islands/heartbeat"),
        }
        results = {name: Round(name) for name in endpoints}
        with common.stage("warming up the three endpoints"):
            for endpoint in endpoints.values():
                asyncio.run(drive(endpoint.url, requests, connections, 2, Round("warm-up")))
        for number in range(rounds):
            # Rotate which goes first, so a neighbour's load rising or
            # falling over the run weighs on all three alike.
            names = list(endpoints)
            order = names[number % 3 :] + names[: number % 3]
            for name in order:
                endpoint, result = endpoints[name], results[name]
                done, spent = result.ok(), result.seconds
                with (
                    common.stage(f"round {number + 1}/{rounds}: {name}"),
                    common.CpuMeter(endpoint.server.pid) as cpu,
                ):
                    asyncio.run(drive(endpoint.url, requests, connections, seconds, result))
                result.cpu.append(cpu.share)
                result.per_round.append((result.ok() - done) / (result.seconds - spent))
        if profile:
            with common.stage(f"profiling daphne with py-spy during a heartbeat round into {profile}"):
                spy = common.py_spy(server.pid, seconds, profile)
                asyncio.run(
                    drive(endpoints["heartbeat"].url, requests, connections, seconds, Round("profile"))
                )
                spy.wait()
        tracebacks = server.output().count("Traceback") + bare.output().count("Traceback")
        scaled = scale_out(server, requests, connections, seconds, rounds) if scale else None

    acknowledged = dict(results["heartbeat"].acknowledged)
    if scaled is not None:
        for result in scaled.values():
            for index, sent_at in result.acknowledged.items():
                acknowledged[index] = max(sent_at, acknowledged.get(index, 0.0))
    unwritten = _unwritten(pairs, acknowledged)
    floor = results["bare"].rate()
    ratios = {name: result.rate() / floor if floor else 0.0 for name, result in results.items()}
    table = common.Table(
        f"HTTP heartbeats: {islands} Islands, {connections} connections, {rounds}×{seconds:g} s per endpoint",
        [
            "endpoint",
            "requests",
            "errors",
            "req/s",
            "× bare",
            "p50 ms",
            "p99 ms",
            "server CPU ms/req",
            "server CPU",
            "client CPU",
            "others",
        ],
    )
    for name, result in results.items():
        endpoint = endpoints[name]
        table.add(
            f"{endpoint.label} ({endpoint.path})",
            result.ok(),
            sum(result.errors.values()) or 0,
            f"{result.rate():.0f}",
            f"{ratios[name]:.2f}",
            common.ms(common.percentile(result.latencies, 50)),
            common.ms(common.percentile(result.latencies, 99)),
            f"{cpu_per_request(result) * 1000:.2f}",
            *common.mean_share(result.cpu).columns(),
        )
    errors = any(result.errors for result in results.values())
    met = {name: ratios[name] >= target for name, target in TARGETS.items()}
    passed = all(met.values()) and not errors and not unwritten
    bare_cpu = cpu_per_request(results["bare"])
    for name, target in TARGETS.items():
        by_cpu = bare_cpu / max(cpu_per_request(results[name]), 1e-9)
        table.note(
            f"{name} / bare: {ratios[name]:.2f} (target ≥ {target}) {'met' if met[name] else 'NOT MET'}; "
            f"by server CPU per request {by_cpu:.2f}"
        )
    heartbeat_to_ping = results["heartbeat"].rate() / max(results["ping"].rate(), 1e-9)
    rounds_text = ", ".join(
        f"{name} {[round(rate) for rate in result.per_round]}" for name, result in results.items()
    )
    table.note(f"heartbeat / ping: {heartbeat_to_ping:.2f}; req/s per round: {rounds_text}")
    table.note(f"{'PASS' if passed else 'FAIL'}")
    table.note(
        f"heartbeats answered 200 but not in the database: {unwritten} "
        f"(of {len(acknowledged)} Islands checked); "
        f"tracebacks in the server logs: {tracebacks}"
    )
    if errors:
        table.note("errors by status: " + ", ".join(f"{name} {r.errors}" for name, r in results.items()))
    table.note(
        "CPU columns: percent of all cores during the rounds (server = the daphne answering that endpoint, "
        "client = this load generator)."
    )
    table.note(common.machine_line())
    table.print()
    if scaled is not None:
        passed = print_scale_out(scaled, rounds, unwritten) and passed
    if profile and Path(profile).exists():
        print(common.summarize_profile(Path(profile)), flush=True)
    elif profile:
        print("(no profile: py-spy could not attach to daphne; it needs ptrace permission)", flush=True)
    return passed


# Two web processes may lose at most this much of one process's heartbeat throughput.
SCALE_OUT_TOLERANCE = 0.15


def scale_out(
    server: common.Daphne,
    requests: list[tuple[dict[str, str], bytes]],
    connections: int,
    seconds: float,
    rounds: int,
) -> dict[str, Round]:
    """Heartbeats on one web process, then shared by two, against the same PostgreSQL and Redis.

    The same 64 connections either all reach `server` or are split between
    it and a second daphne started alike, as a load balancer would split
    them; rounds alternate.
    """
    path = "/api/v1/islands/heartbeat"
    results = {"one process": Round("one process"), "two processes": Round("two processes")}
    with common.Daphne(name="heartbeats-second") as second:
        asyncio.run(drive(second.url + path, requests, connections, 2, Round("warm-up")))
        urls = {"one process": [server.url + path], "two processes": [server.url + path, second.url + path]}
        for number in range(rounds):
            order = list(urls) if number % 2 == 0 else list(urls)[::-1]
            for name in order:
                result = results[name]
                done, spent = result.ok(), result.seconds
                with common.stage(f"scale-out round {number + 1}/{rounds}: {name}"):
                    asyncio.run(drive(urls[name], requests, connections, seconds, result))
                result.per_round.append((result.ok() - done) / (result.seconds - spent))
        if "Traceback" in second.output():
            print(second.output()[-3000:], flush=True)
    return results


def print_scale_out(results: dict[str, Round], rounds: int, unwritten: int) -> bool:
    from islands.models import StatusChange

    one, two = results["one process"], results["two processes"]
    ratio = two.rate() / max(one.rate(), 1e-9)
    # A status change recorded twice breaks the chain every Island's changes
    # form (each row's from_status is the previous row's to_status, the
    # first from the seeded "online"). Islands late between rounds (over
    # 45 s without a beat while servers start) rightly record a silence and
    # a return; those are counted apart.
    changes = doubled = 0
    last: dict[Any, str] = {}
    rows = StatusChange.objects.order_by("island_id", "at", "pk").values_list(
        "island_id", "from_status", "to_status"
    )
    for island_id, from_status, to_status in rows:
        changes += 1
        doubled += from_status != last.get(island_id, "online")
        last[island_id] = to_status
    table = common.Table(
        f"Scale-out: heartbeats on one web process and on two, {rounds} rounds each",
        ["web processes", "requests", "errors", "req/s", "× one", "p50 ms", "p99 ms", "req/s per round"],
    )
    for result in (one, two):
        table.add(
            result.name,
            result.ok(),
            sum(result.errors.values()) or 0,
            f"{result.rate():.0f}",
            f"{result.rate() / max(one.rate(), 1e-9):.2f}",
            common.ms(common.percentile(result.latencies, 50)),
            common.ms(common.percentile(result.latencies, 99)),
            ", ".join(str(round(rate)) for rate in result.per_round),
        )
    passed = ratio >= 1 - SCALE_OUT_TOLERANCE and not one.errors and not two.errors and not unwritten
    table.note(
        f"two / one: {ratio:.2f} (target ≥ {1 - SCALE_OUT_TOLERANCE:.2f}: within 15% of one process) "
        f"{'met' if passed else 'NOT MET'}"
    )
    table.note(
        f"lost: {unwritten} heartbeats answered 200 but not in the database (both setups); "
        f"doubled: {doubled} status changes out of their Island's chain (of {changes} recorded)"
    )
    table.note(common.machine_line())
    table.print()
    return passed and doubled == 0


@dataclass
class Endpoint:
    label: str
    server: common.Daphne
    path: str

    @property
    def url(self) -> str:
        return self.server.url + self.path


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
    parser.add_argument(
        "--scale-out",
        action="store_true",
        help="then heartbeats on one web process and shared by two (docs/deploy.md's sizing)",
    )
    args = parser.parse_args(argv)
    profile = None if args.no_profile else args.profile or str(common.workdir() / "heartbeat-profile.txt")
    return run(args.islands, args.connections, args.seconds, args.rounds, profile, args.scale_out)


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
