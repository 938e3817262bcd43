"""Live confirmation: from the mobile API's 201 to the browser's socket saying "paired".

With `--sockets` (1,000) signed-in browsers watching their pairing sessions
on one daphne process, simulated phones redeem `--samples` of those sessions
one after another through POST /api/v1/mobile/pair (by QR secret). For each,
the client notes when the 201 arrived and when the owning browser's socket
received the "paired" snapshot; both are seen by the same event loop, so
the difference needs no clock synchronisation.

The baseline, measured in the same run on the same Redis, is the raw
channel layer: channels-redis group_send to a group of one channel, and
that channel's receive, in this process.

    python -m bench.confirmation [--sockets 1000] [--samples 300]
"""

import argparse
import asyncio
import json
import time
from typing import Any

from bench import common
from bench.browsers import (
    Browser,
    Sockets,
    browser_headers,
    client_session,
    close_all,
    open_sockets,
    seed_browsers,
)
from simulator.phone import DEVICES

TARGET_P99_MS = 50
TARGET_RATIO = 2.0
DEVICE = DEVICES["ios"]


class RawLayer:
    """group_send → receive through channels-redis, with the application's layer settings."""

    group = "bench.raw.group"

    async def __aenter__(self) -> "RawLayer":
        from channels.layers import get_channel_layer

        self.layer = get_channel_layer()
        assert self.layer is not None
        self.channel = await self.layer.new_channel("bench.raw.")
        await self.layer.group_add(self.group, self.channel)
        for n in range(10):  # the first few open the pool's connections
            await self.sample(n)
        return self

    async def sample(self, n: int) -> float:
        started = time.perf_counter()
        await self.layer.group_send(self.group, {"type": "bench.ping", "n": n})
        message = await self.layer.receive(self.channel)
        assert message["n"] == n
        return time.perf_counter() - started

    async def __aexit__(self, *exc: object) -> None:
        await self.layer.group_discard(self.group, self.channel)


async def pairings(
    server: common.Daphne, browsers: list[Browser], sockets_wanted: int, samples: int
) -> dict[str, Any]:
    sockets = Sockets()
    urls = [
        (n, f"{server.ws_url}/ws/pair/mobile/{browser.session_id}/", browser_headers(server, browser))
        for n, browser in enumerate(browsers[:sockets_wanted])
    ]
    after_201: list[float] = []
    request_to_201: list[float] = []
    request_to_paired: list[float] = []
    raw: list[float] = []
    errors: dict[str, int] = {}
    async with client_session() as session, RawLayer() as layer:
        with common.stage(f"opening {sockets_wanted:,} browser sockets"):
            await open_sockets(session, urls, sockets, 100)
        if len(sockets.open) != sockets_wanted:
            raise SystemExit(f"only {len(sockets.open)} of {sockets_wanted} sockets opened: {sockets.failed}")
        await asyncio.sleep(2)
        # Spread the redeemed sessions over all the open sockets.
        step = max(1, sockets_wanted // samples)
        with common.stage(f"pairing {samples} phones one after another, each after a raw layer sample"):
            for sample in range(samples):
                # Interleaved, so a neighbour's burst of CPU hits both alike.
                raw.append(await layer.sample(sample))
                index = (sample * step) % sockets_wanted
                browser = browsers[index]
                body = json.dumps(
                    {"secret": browser.secret, "host_id": f"bench-phone-{index:06d}", "device": DEVICE}
                )
                sent = time.perf_counter()
                async with session.post(
                    f"{server.url}/api/v1/mobile/pair",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as response:
                    await response.read()
                    answered = time.perf_counter()
                if response.status != 201:
                    errors[str(response.status)] = errors.get(str(response.status), 0) + 1
                    continue
                try:
                    arrived, message = await asyncio.wait_for(sockets.inbox[index].get(), timeout=10)
                except TimeoutError:
                    errors["no paired message within 10 s"] = (
                        errors.get("no paired message within 10 s", 0) + 1
                    )
                    continue
                if message.get("state") != "paired":
                    errors[f"got {message.get('state')}"] = errors.get(f"got {message.get('state')}", 0) + 1
                    continue
                request_to_201.append(answered - sent)
                request_to_paired.append(arrived - sent)
                after_201.append(arrived - answered)
                await asyncio.sleep(0.01)
        await close_all(sockets)
    return {
        "after_201": after_201,
        "request_to_201": request_to_201,
        "request_to_paired": request_to_paired,
        "raw": raw,
        "errors": errors,
        "closed": sockets.closed,
    }


def run(sockets_wanted: int, samples: int) -> bool:
    common.setup_django()
    with common.stage(f"seeding {sockets_wanted:,} signed-in users with a pairing session each"):
        browsers = seed_browsers(sockets_wanted)
    with common.Daphne(name="confirmation") as server:
        result = asyncio.run(pairings(server, browsers, sockets_wanted, samples))
        tracebacks = server.output().count("Traceback")
    after, raw = result["after_201"], result["raw"]
    # The page may hear "paired" before the phone's 201 arrives: the event is
    # sent when the transaction commits, before the response is written.
    # For the targets, "before" counts as zero delay.
    waited = [max(0.0, value) for value in after]
    table = common.Table(
        f"Live confirmation with {sockets_wanted:,} sockets open ({len(after)} pairings)",
        ["measure", "samples", "p50 ms", "p99 ms", "max ms"],
    )
    for name, values in (
        ("raw layer: group_send → receive", raw),
        ("page after the phone's 201 (negative: before)", after),
        ("phone: request → 201", result["request_to_201"]),
        ("page: request → paired", result["request_to_paired"]),
    ):
        table.add(
            name,
            len(values),
            common.ms(common.percentile(values, 50)),
            common.ms(common.percentile(values, 99)),
            common.ms(max(values) if values else float("nan")),
        )
    p99 = common.percentile(waited, 99)
    raw_p99 = common.percentile(raw, 99)
    passed = (
        p99 * 1000 <= TARGET_P99_MS
        and p99 <= TARGET_RATIO * raw_p99
        and not result["errors"]
        and len(after) == samples
        and not tracebacks
    )
    early = sum(value <= 0 for value in after)
    table.note(
        f"page after 201, p99 {common.ms(p99)} ms (target ≤ {TARGET_P99_MS} ms and ≤ {TARGET_RATIO:g}× "
        f"the raw layer's p99 {common.ms(raw_p99)} ms): {'PASS' if passed else 'FAIL'}; "
        f"the page had it before the phone's 201 in {early} of {len(after)}"
    )
    table.note(
        f"errors {result['errors'] or 'none'}; sockets closed by the server {result['closed'] or 'none'}; "
        f"tracebacks in the server log: {tracebacks}"
    )
    table.note(common.machine_line())
    table.print()
    return passed


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args(argv)
    return run(args.sockets, args.samples)


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
