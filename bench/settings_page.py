"""/settings ("Your Islands") with 1, 50 and 200 Islands: queries and render time.

For each size an owner gets that many Islands of mixed kinds and states
(online, offline, signed off, suspended; desktops and phones; jobs counted).
The page is rendered in this process with Django's test client, counting
queries (they must not grow with the Islands) and timing the view, and
fetched from daphne with the owner's session cookie. The baseline is
GET /api/v1/ping on the same daphne in the same run.

    python -m bench.settings_page [--sizes 1,50,200] [--repeat 30]
"""

import argparse
import asyncio
import time
from decimal import Decimal
from typing import Any

from bench import common


def seed_owner(size: int) -> Any:
    from django.contrib.auth.models import User
    from django.utils import timezone

    from islands.models import Island, offline_threshold

    now = timezone.now()
    owner = User.objects.create_user(f"owner{size}")
    islands = []
    for n in range(size):
        mobile = n % 4 == 3
        online = n % 3 != 0
        islands.append(
            Island(
                owner=owner,
                host_id=f"settings-{size}-{n:05d}",
                name=f"Island {n}",
                kind=Island.Kind.MOBILE if mobile else Island.Kind.DESKTOP,
                device_model="iPhone 15 Pro" if mobile else "",
                runtime="coreml" if mobile else "",
                accelerator="ane" if mobile else "",
                gpu_model="" if mobile else "RTX 4090",
                gpu_vram_mb=None if mobile else 24576,
                cpu_cores=6 if mobile else 16,
                ram_mb=8192 if mobile else 65536,
                status=Island.Status.SIGNED_OFF if n % 7 == 5 else Island.Status.ONLINE,
                last_heartbeat_at=now,
                offline_after=now + offline_threshold() if online else now,
                suspended_at=now if n % 11 == 10 else None,
                jobs_completed=n * 3,
                jobs_failed=n % 5,
                earnings=Decimal(n) * Decimal("2.5"),
                metrics={"active_jobs": n % 2, "system": {"cpu_percent": 12.5}},
            )
        )
    Island.objects.bulk_create(islands)
    return owner


def render_in_process(owner: Any, repeat: int) -> tuple[int, list[float], int]:
    """(queries per render, render seconds, response size) through Django's handler."""
    from django.db import connection
    from django.test import Client

    client = Client(headers={"host": "127.0.0.1"})
    client.force_login(owner)
    client.get("/settings")  # warm the template cache
    statements: list[str] = []

    def count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        statements.append(sql)
        return execute(sql, params, many, context)

    # Not CaptureQueriesContext: the request_started signal resets its log.
    with connection.execute_wrapper(count):
        response = client.get("/settings")
    assert response.status_code == 200, response.status_code
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        client.get("/settings")
        times.append(time.perf_counter() - started)
    return len(statements), times, len(response.content)


async def fetch(url: str, cookie: str | None, repeat: int) -> list[float]:
    import aiohttp

    times = []
    headers = {"Cookie": cookie} if cookie else {}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for n in range(repeat + 3):
            started = time.perf_counter()
            async with session.get(url, headers=headers, allow_redirects=False) as response:
                await response.read()
                assert response.status == 200, response.status
            if n >= 3:
                times.append(time.perf_counter() - started)
    return times


def session_cookie(owner: Any) -> str:
    from django.conf import settings
    from django.test import Client

    client = Client()
    client.force_login(owner)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


def run(sizes: list[int], repeat: int) -> bool:
    common.setup_django()
    with common.stage(f"seeding owners with {', '.join(map(str, sizes))} Islands"):
        owners = {size: seed_owner(size) for size in sizes}
    table = common.Table(
        f"/settings by number of Islands ({repeat} renders each)",
        ["page", "queries", "KiB", "view p50 ms", "view p95 ms", "daphne p50 ms", "daphne p95 ms"],
    )
    query_counts = []
    with common.Daphne(name="settings") as server:
        ping = asyncio.run(fetch(f"{server.url}/api/v1/ping", None, repeat))
        table.add(
            "baseline: GET /api/v1/ping",
            0,
            "",
            "",
            "",
            common.ms(common.percentile(ping, 50)),
            common.ms(common.percentile(ping, 95)),
        )
        for size, owner in owners.items():
            queries, times, size_bytes = render_in_process(owner, repeat)
            query_counts.append(queries)
            served = asyncio.run(fetch(f"{server.url}/settings", session_cookie(owner), repeat))
            table.add(
                f"/settings, {size} Island{'s' if size != 1 else ''}",
                queries,
                f"{size_bytes / 1024:.0f}",
                common.ms(common.percentile(times, 50)),
                common.ms(common.percentile(times, 95)),
                common.ms(common.percentile(served, 50)),
                common.ms(common.percentile(served, 95)),
            )
    constant = len(set(query_counts)) == 1
    table.note(
        f"queries per page: {query_counts} ({'constant: PASS' if constant else 'they grow: FAIL'}); "
        "view = Django's handler in this process, daphne = over HTTP with the owner's session cookie."
    )
    table.note(common.machine_line())
    table.print()
    return constant


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,50,200")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    return run([int(size) for size in args.sizes.split(",")], args.repeat)


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
