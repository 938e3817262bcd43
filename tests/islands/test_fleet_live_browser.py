"""'Your Islands' updates by itself in a real browser, DEBUG on and off.

Each change reaches the page within 2 s with no click and no reload: a
first heartbeat, a sign-off, a return and a job's outcome over the socket,
a silence by the clock (no watcher runs). Without the socket the page
polls. "Last heartbeat" counts up between renders.
"""

import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from islands.models import Island
from simulator.desktop import Client
from tests.conftest import login_browser
from tests.islands.conftest import give_job, make_island

# The issue's promise: a change shows within 2 s.
LIVE_MS = 2000


def wait_for_status(page, island: Island, status: str, timeout: float = LIVE_MS) -> float:
    """Seconds until the Island's card shows `status`."""
    started = time.monotonic()
    page.locator(f'[data-island="{island.pk}"] [data-status="{status}"]').first.wait_for(timeout=timeout)
    return time.monotonic() - started


@pytest.mark.browser
def test_status_and_counters_change_within_two_seconds_without_a_reload(
    browser_page, live_server_debug, alice
):
    server = live_server_debug
    island = make_island(alice, name="Garage rig")
    api = Client(server.url, token=island.issue_token())
    page = browser_page
    login_browser(page, server, alice)
    page.goto(server.url + "/settings")
    card = page.locator(f'[data-island="{island.pk}"]')
    assert card.locator(".status").inner_text() == "Waiting for its first heartbeat"
    page.locator('#island-list[data-connection="live"]').wait_for()
    page.evaluate("window.notReloaded = true")
    seen = {}

    assert api.post("/api/v1/islands/heartbeat", {"status": "online"})[0] == 200
    seen["first heartbeat"] = wait_for_status(page, island, "online")
    # Heartbeats send nothing, so "ago" counts up in the browser.
    before = card.locator("time.ago").inner_text()
    page.wait_for_timeout(2100)
    assert card.locator("time.ago").inner_text() != before

    assert api.post("/api/v1/islands/heartbeat", {"status": "offline"})[0] == 200
    seen["sign-off"] = wait_for_status(page, island, "signed_off")
    assert card.get_by_text("Offline, no karma charge").is_visible()

    assert api.post("/api/v1/islands/heartbeat", {"status": "online"})[0] == 200
    seen["return"] = wait_for_status(page, island, "online")

    job = give_job(island=island, job_id="job-live-1", credits=Decimal(3))
    assert api.post(f"/api/v1/islands/jobs/{job.job_id}/status", {"state": "succeeded"})[0] == 200
    started = time.monotonic()
    card.locator(".count.good", has_text="1").wait_for(timeout=LIVE_MS)
    seen["job outcome"] = time.monotonic() - started
    assert page.locator(".fleet-summary").get_by_text("1 completed").is_visible()

    # A silence, by the clock alone: the deadline is a second away and no watcher runs.
    Island.objects.filter(pk=island.pk).update(offline_after=timezone.now() + timedelta(seconds=1))
    page.get_by_role("link", name="Refresh Islands").click()
    page.locator("#island-list[data-next-change]").wait_for()
    seen["silence"] = wait_for_status(page, island, "offline", timeout=1000 + LIVE_MS)
    assert card.get_by_text("costs karma from").is_visible()

    assert page.evaluate("window.notReloaded") is True
    print(
        f"DEBUG={'on' if server.debug else 'off'}: seconds to show "
        + ", ".join(f"{name} {seconds:.2f}" for name, seconds in seen.items())
    )


@pytest.mark.browser
@pytest.mark.parametrize("live_server_debug", [True], indirect=True)
def test_without_the_socket_the_page_polls(browser_page, live_server_debug, alice):
    server = live_server_debug
    island = make_island(alice)
    api = Client(server.url, token=island.issue_token())
    page = browser_page
    # A network that refuses websockets.
    page.add_init_script("window.WebSocket = function () { throw new Error('no websockets here'); };")
    login_browser(page, server, alice)
    page.goto(server.url + "/settings")
    page.locator('#island-list[data-connection="polling"]').wait_for()
    page.get_by_text("checking every 5 s").wait_for()
    assert api.post("/api/v1/islands/heartbeat", {"status": "online"})[0] == 200
    wait_for_status(page, island, "online", timeout=7000)
    assert page.locator(".updated time").inner_text().count(":") == 2
