"""'Your Islands' in a real browser: Refresh Islands shows status changes in place."""

from datetime import timedelta

import pytest
from django.utils import timezone

from islands.models import Island
from simulator.desktop import Client
from tests.conftest import login_browser
from tests.islands.conftest import make_island


@pytest.mark.browser
def test_refresh_islands_shows_a_status_change_without_a_reload(browser_page, daphne_server, alice):
    island = make_island(alice)
    api = Client(daphne_server.url, token=island.issue_token())
    page = browser_page
    login_browser(page, daphne_server, alice)
    page.goto(daphne_server.url + "/settings")
    card = page.locator(f'[data-island="{island.pk}"]')
    assert card.locator(".status").inner_text() == "Waiting for its first heartbeat"
    assert card.get_by_text("none yet").is_visible()
    # Survives only if the page is not reloaded.
    page.evaluate("window.notReloaded = true")

    assert api.post("/api/v1/islands/heartbeat", {"status": "online"})[0] == 200
    page.get_by_role("link", name="Refresh Islands").click()
    card.locator('[data-status="online"]').wait_for()
    assert card.locator(".status").inner_text() == "Online"
    assert card.get_by_text(" s ago").is_visible()

    # Silence: the deadline passes (moved, not waited for) and nobody runs the watcher.
    Island.objects.filter(pk=island.pk).update(offline_after=timezone.now() - timedelta(seconds=1))
    page.get_by_role("link", name="Refresh Islands").click()
    card.locator('[data-status="offline"]').wait_for()
    assert card.locator(".status").inner_text() == "Down"
    assert card.get_by_text("costs karma from").is_visible()

    assert api.post("/api/v1/islands/heartbeat", {"status": "online"})[0] == 200
    assert api.post("/api/v1/islands/heartbeat", {"status": "offline"})[0] == 200
    page.get_by_role("link", name="Refresh Islands").click()
    card.locator('[data-status="signed_off"]').wait_for()
    assert card.get_by_text("Offline, no karma charge").is_visible()

    assert page.evaluate("window.notReloaded") is True
    assert page.url == daphne_server.url + "/settings"


@pytest.mark.browser
def test_renaming_shows_errors_and_then_saves(browser_page, daphne_server, alice):
    island = make_island(alice, name="Garage rig")
    page = browser_page
    login_browser(page, daphne_server, alice)
    page.goto(daphne_server.url + "/settings")
    card = page.locator(f'[data-island="{island.pk}"]')
    card.get_by_text("Rename").click()
    card.get_by_label("New name").fill("")
    card.get_by_role("button", name="Save name").click()
    card = page.locator(f'[data-island="{island.pk}"]')
    card.get_by_text("Give the Island a name.").wait_for()
    card.get_by_label("New name").fill("Attic server")
    card.get_by_role("button", name="Save name").click()
    page.get_by_text("Island renamed to “Attic server”.").wait_for()
    assert page.get_by_role("heading", name="Attic server").is_visible()
