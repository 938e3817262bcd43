"""Take the README's screenshots again: /settings, an Island's page and /pair, at 1280 and 390 px.

    .venv/bin/python docs/screenshots/take.py

Builds a demo account on a throwaway SQLite database (never the configured
one), serves it with daphne on a spare port, and drives Debian's chromium
(Playwright) over it. The PNGs land next to this file. Needs the dev
extras (`make test` installs them) and /usr/bin/chromium.
"""

import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE_DIR = HERE.parent.parent
WIDTHS = (1280, 390)
TALLEST = 2000
# Each screenshot: its file name's start and its path, filled in with the demo Island's id.
SHOTS = [
    ("settings-cards", "/settings?view=cards"),
    ("settings-table", "/settings?view=table"),
    ("island", "/settings/islands/{island}"),
    ("pair", "/pair"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _demo_data() -> tuple[str, str]:
    """A demo account: eight Islands in every state, one with 30 days of history.

    Returns the account's session cookie and the Island with history.
    """
    import time_machine
    from django.contrib.auth.models import User
    from django.db import transaction
    from django.db.models import F
    from django.test import Client

    from islands.models import Island, Job, JobSpec, Seat, StatusChange
    from karma.models import KarmaEvent

    now = datetime.now(UTC).replace(microsecond=0)
    rng = random.Random(16)  # noqa: S311 (demo numbers, the same every run)
    user = User.objects.create_user("demo", password="demo-password-16")  # noqa: S106 (a throwaway database)
    hardware = [
        ("RTX 4090", 24576, 16, 65536),
        ("RTX 3080", 10240, 12, 32768),
        ("", None, 8, 16384),
        ("A100", 81920, 64, 262144),
    ]

    def island(n: int, name: str, **fields: object) -> Island:
        gpu, vram, cores, ram = hardware[n % len(hardware)]
        return Island.objects.create(
            owner=user,
            host_id=f"demo-host-{n:04d}",
            name=name,
            gpu_model=gpu,
            gpu_vram_mb=vram,
            cpu_cores=cores,
            ram_mb=ram,
            paired_at=now - timedelta(days=40),
            **fields,
        )

    online = {
        "status": "online",
        "last_heartbeat_at": now - timedelta(seconds=7),
        "offline_after": now + timedelta(seconds=38),
    }
    main = island(0, "Studio workstation", **online)
    island(1, "Garage rig", **online)
    island(
        2,
        "Basement server",
        status="offline",
        last_heartbeat_at=now - timedelta(minutes=9),
        offline_after=now - timedelta(minutes=8),
    )
    island(
        3,
        "Lab A100",
        status="signed_off",
        last_heartbeat_at=now - timedelta(hours=3),
        offline_after=now - timedelta(hours=3),
    )
    island(4, "New laptop")
    for n in range(5, 8):
        island(n, f"Render node {n - 4}", **online)

    # Thirty days of the main Island: mostly online, a crash, a weekend signed off.
    start = datetime.combine((now - timedelta(days=29)).date(), datetime.min.time(), tzinfo=UTC)
    changes = [(start - timedelta(days=1), "offline", "online", "first_heartbeat")]
    for day, down_hours, reason in ((6, 5, "silence"), (17, 1, "silence"), (12, 40, "graceful")):
        went = start + timedelta(days=day, hours=9)
        changes.append((went, "online", "offline" if reason == "silence" else "signed_off", reason))
        changes.append(
            (
                went + timedelta(hours=down_hours),
                "offline" if reason == "silence" else "signed_off",
                "online",
                "back_online",
            )
        )
    for at, from_status, to_status, reason in sorted(changes):
        StatusChange.objects.create(
            island=main, at=at, from_status=from_status, to_status=to_status, reason=reason
        )

    number = 0
    for day in range(30):
        for _ in range(rng.randint(2, 9)):
            number += 1
            when = start + timedelta(days=day, hours=rng.randint(0, 23), minutes=rng.randint(0, 59))
            if when > now:
                continue
            credits = Decimal(rng.randint(5, 40)) / 4
            with time_machine.travel(when, tick=False):
                spec = JobSpec(
                    job_id=f"demo-job-{number:05d}",
                    workload="llm-chat",
                    lease=timedelta(minutes=5),
                    budget=credits,
                    credits=credits,
                )
                with transaction.atomic():
                    Island.objects.filter(pk=main.pk).update(jobs_running=F("jobs_running") + 1)
                    job = Job.objects._record(
                        spec, Seat(main.pk, main.host_id, main.transport, credits), when, None
                    )
                state = "failed" if rng.random() < 0.1 else "succeeded"
                Job.objects.apply_status(
                    main, job.job_id, state, "out of memory" if state == "failed" else None
                )
    KarmaEvent.objects.adjust(
        main, Decimal(-6), "Demo: a rough start", by=None, now=start + timedelta(days=2)
    )

    client = Client()
    client.force_login(user)
    from django.conf import settings

    return client.cookies[settings.SESSION_COOKIE_NAME].value, str(main.pk)


def main() -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("DATABASE_URL", "REDIS_URL", "NATS_URL")
        }
        env |= {
            "DATABASE_URL": f"sqlite:///{tmp}/demo.sqlite3",
            "DJANGO_SETTINGS_MODULE": "archipelag.settings",
            "DEBUG": "1",
        }
        os.environ.clear()
        os.environ.update(env)
        sys.path.insert(0, str(BASE_DIR))
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0)
        cookie, island = _demo_data()

        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(  # noqa: S603 (our own command line)
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "archipelag.asgi:application",
            ],
            cwd=BASE_DIR,
            env={**env, "PUBLIC_URL": url},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(url + "/healthz", timeout=1)  # noqa: S310 (our own server)
                    break
                except OSError:
                    time.sleep(0.2)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium", args=["--no-sandbox", "--headless"]
                )
                context = browser.new_context(color_scheme="light", timezone_id="UTC")
                context.add_cookies([{"name": "sessionid", "value": cookie, "url": url}])
                page = context.new_page()
                for width in WIDTHS:
                    page.set_viewport_size({"width": width, "height": 900})
                    for name, path in SHOTS:
                        page.goto(url + path.format(island=island))
                        page.wait_for_load_state("networkidle")
                        target = HERE / f"{name}-{width}.png"
                        # The whole page, down to TALLEST px (the Island page's tables run long).
                        height = min(TALLEST, page.evaluate("document.documentElement.scrollHeight"))
                        page.screenshot(
                            path=str(target),
                            full_page=True,
                            clip={"x": 0, "y": 0, "width": width, "height": height},
                        )
                        print(target.relative_to(BASE_DIR))
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
