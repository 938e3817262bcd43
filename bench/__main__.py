"""Run every benchmark, one after another, and say which met its target.

    python -m bench                          # what `make bench` runs
    python -m bench heartbeats websockets    # some of them

Each runs in a process of its own (a fresh bench database, no sockets or
pools left over from the one before) and prints its own table; see
docs/performance.md for what they measure. The exit status is 1 when a
benchmark missed its target or failed to run. nats_heartbeats (the NATS
bridge's throughput, docs/nats.md) needs a NATS server at NATS_URL and is
skipped, saying so, when none answers; it prints whether its target was met
rather than failing on it. dispatch_latency (submit → AssignJob received,
docs/dispatch.md#delivery) needs NATS with JetStream too, and is skipped
the same way. nats_callout (1,000 Islands connecting through the NATS auth
callout, docs/nats.md) starts a nats-server of its own from the venv.
"""

import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

BENCHMARKS = [
    "heartbeats",
    "websockets",
    "confirmation",
    "settings_page",
    "nats_heartbeats",
    "placement",
    "dispatch_latency",
    "nats_callout",
    "login_flood",
]
NEEDS_NATS = {"nats_heartbeats", "dispatch_latency"}


def command(name: str) -> list[str]:
    if name == "nats_heartbeats":
        return [sys.executable, "bench/nats_heartbeats.py"]
    return [sys.executable, "-m", f"bench.{name}"]


def nats_answers() -> bool:
    url = urlsplit(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 4222), timeout=1):
            return True
    except OSError:
        return False


def main() -> int:
    names = sys.argv[1:] or BENCHMARKS
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    outcomes: dict[str, str] = {}
    for name in names:
        print(f"\n=== bench.{name} ===", flush=True)
        if name in NEEDS_NATS and not nats_answers():
            print("skipped: no NATS server answers at NATS_URL (nats://127.0.0.1:4222 by default)")
            outcomes[name] = "SKIPPED (no NATS)"
            continue
        env = dict(os.environ)
        if name == "nats_heartbeats":
            # Its own bench database (kept between its runs), never DATABASE_URL's.
            env.pop("DATABASE_URL", None)
        started = time.monotonic()
        status = subprocess.call(command(name), env=env)
        outcome = {0: "PASS", 1: "FAIL"}.get(status, f"ERROR (exit {status})")
        if name == "nats_heartbeats" and status == 0:
            outcome = "RAN (its output says whether the target was met)"
        outcomes[name] = f"{outcome} ({time.monotonic() - started:.0f} s)"
    print("\n=== summary ===")
    for name, outcome in outcomes.items():
        print(f"{name:16} {outcome}")
    failed = [o for o in outcomes.values() if o.startswith(("FAIL", "ERROR"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
