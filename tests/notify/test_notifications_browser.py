"""/settings/notifications and the card's maintenance in chromium, DEBUG on and off."""

import re

import pytest

from islands.models import MaintenanceWindow
from notify.models import Preferences, WebhookEndpoint
from tests.conftest import login_browser
from tests.islands.conftest import make_island


@pytest.mark.browser
def test_alerts_page_saves_switches_shows_errors_and_a_new_secret_once(
    browser_page, live_server_debug, alice
):
    page = browser_page
    login_browser(page, live_server_debug, alice)
    page.goto(live_server_debug.url + "/settings")
    page.get_by_role("link", name="Alerts").click()
    page.get_by_label("Tell me an Island is offline after").fill("61")
    page.get_by_role("button", name="Save").click()
    page.get_by_text("less than or equal to 60").wait_for()
    page.get_by_label("Tell me an Island is offline after").fill("10")
    page.get_by_label("It is back online").uncheck()
    page.get_by_role("button", name="Save").click()
    page.get_by_text("Your notification settings are saved.").wait_for()
    preferences = Preferences.objects.get(user=alice)
    assert (preferences.offline_grace_minutes, preferences.online) == (10, False)

    page.get_by_label("URL").fill("http://example.com/hook")
    page.get_by_role("button", name="Add endpoint").click()
    if live_server_debug.debug:
        # Local receivers and plain http are allowed with DEBUG (WEBHOOKS_ALLOW_PRIVATE).
        page.locator("#new-secret").wait_for()
        WebhookEndpoint.objects.all().delete()
        page.goto(live_server_debug.url + "/settings/notifications")
    else:
        page.get_by_text("Webhook URLs must start with https://.").wait_for()
    page.get_by_label("URL").fill("https://example.com/hook")
    page.get_by_role("button", name="Add endpoint").click()
    secret = page.locator("#new-secret code.secret").inner_text()
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/=]{32}", secret)
    assert WebhookEndpoint.objects.get().secret() == secret
    page.goto(live_server_debug.url + "/settings/notifications")
    assert "whsec_" not in page.content()
    assert page.get_by_role("button", name="Send test event").is_visible()


@pytest.mark.browser
def test_the_card_starts_and_ends_maintenance(browser_page, live_server_debug, alice):
    island = make_island(alice, name="Garage rig")
    page = browser_page
    login_browser(page, live_server_debug, alice)
    page.goto(live_server_debug.url + "/settings")
    card = page.locator(f'[data-island="{island.pk}"]')
    card.get_by_text("Maintenance…").click()
    card.get_by_label("Until (UTC)").fill("23:59")
    card.get_by_role("button", name="Start maintenance").click()
    card = page.locator(f'[data-island="{island.pk}"]')
    card.get_by_text("Maintenance until 23:59 UTC").wait_for()
    assert MaintenanceWindow.objects.filter(island=island).count() == 1
    card.get_by_text("Maintenance…").click()
    card.get_by_role("button", name="End maintenance now").click()
    page.get_by_text("Maintenance of “Garage rig” ended.").wait_for()
    assert not page.locator(f'[data-island="{island.pk}"]').get_by_text("Maintenance until").count()
