"""The fleet table in a real browser, at desktop and phone widths."""

import pytest

from tests.conftest import login_browser
from tests.islands.conftest import make_island


@pytest.mark.browser
@pytest.mark.parametrize("width", [1280, 390])
def test_search_filter_and_sort_the_fleet_table(browser_page, daphne_server, alice, width):
    for n in range(8):
        make_island(alice, f"fleet-host-{n:05d}", name=f"Rig {n}")
    make_island(alice, "garage-host-0001", name="Garage " + "x" * 80)
    page = browser_page
    page.set_viewport_size({"width": width, "height": 800})
    login_browser(page, daphne_server, alice)
    page.goto(daphne_server.url + "/settings")
    assert page.locator(".fleet-summary").inner_text().startswith("0 of 9 online")
    assert page.locator("tr.island-row").count() == 9
    # Nothing pushes the page sideways: a wide table scrolls inside its box.
    assert page.evaluate("document.documentElement.scrollWidth") <= width

    page.get_by_label("Search").fill("garage")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url("**q=garage**")
    assert page.locator("tr.island-row").count() == 1
    assert page.get_by_role("link", name="Garage " + "x" * 80).is_visible()

    page.get_by_role("link", name="Clear").click()
    page.get_by_role("link", name="Name").click()
    page.wait_for_url("**sort=name**")
    names = page.locator("td.name a").all_inner_texts()
    assert names[:2] == ["Garage " + "x" * 80, "Rig 0"]
    page.get_by_role("link", name="Name").click()
    page.wait_for_url("**order=desc**")
    assert page.locator("td.name a").first.inner_text() == "Rig 7"


@pytest.mark.browser
def test_the_copy_button_copies_the_island_id(browser_page, daphne_server, alice):
    island = make_island(alice, name="Copy me")
    page = browser_page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    login_browser(page, daphne_server, alice)
    page.goto(daphne_server.url + "/settings")
    card = page.locator(f'[data-island="{island.pk}"]')
    card.get_by_role("button", name="Copy the Island ID of Copy me").click()
    card.get_by_text("Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == str(island.pk)
