"""Run every benchmark, one after another, and say which met its target.

    python -m bench                          # what `make bench` runs
    python -m bench heartbeats websockets    # some of them

Each runs in a process of its own (a fresh bench database, no sockets or
pools left over from the one before) and prints its own table; see
docs/performance.md for what they measure. The exit status is 1 when a
benchmark missed its target or failed to run.
"""

import subprocess
import sys
import time

BENCHMARKS = ["heartbeats", "websockets", "confirmation", "settings_page"]


def main() -> int:
    names = sys.argv[1:] or BENCHMARKS
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    outcomes: dict[str, str] = {}
    for name in names:
        print(f"\n=== bench.{name} ===", flush=True)
        started = time.monotonic()
        status = subprocess.call([sys.executable, "-m", f"bench.{name}"])
        outcome = {0: "PASS", 1: "FAIL"}.get(status, f"ERROR (exit {status})")
        outcomes[name] = f"{outcome} ({time.monotonic() - started:.0f} s)"
    print("\n=== summary ===")
    for name, outcome in outcomes.items():
        print(f"{name:14} {outcome}")
    return 0 if all(outcome.startswith("PASS") for outcome in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
