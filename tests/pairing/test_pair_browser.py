"""The /pair page in a real browser (Playwright driving Debian's chromium)."""

import pytest

from islands.models import Island
from tests.conftest import login_browser


@pytest.mark.browser
def test_typed_code_is_upper_cased_filtered_and_accepted(browser_page, daphne_server, alice, issue_code):
    issued = issue_code()
    page = browser_page
    login_browser(page, daphne_server, alice)
    page.goto(daphne_server.url + "/pair")

    field = page.locator("input[name=code]")
    typed = f"{issued.code[:3].lower()}-{issued.code[3:].lower()}"
    field.press_sequentially(typed, delay=20)
    assert field.input_value() == issued.code
    field.fill("")
    field.press_sequentially("a3x 9k2!?", delay=10)
    assert field.input_value() == "A3X9K2"
    field.fill("")
    field.press_sequentially(typed, delay=10)

    page.get_by_role("button", name="Continue").click()
    page.get_by_text("Link this Island to your account?").wait_for()
    assert page.url == daphne_server.url + "/pair"  # htmx swapped the step in place
    assert page.get_by_text("RTX 4090, 24 GB VRAM").is_visible()

    page.get_by_role("button", name="Link Island").click()
    page.wait_for_url(daphne_server.url + "/settings")
    assert page.get_by_text("is now linked to your account").is_visible()
    island = Island.objects.get()
    assert island.owner == alice
    assert page.get_by_role("heading", name=island.name).is_visible()


@pytest.mark.browser
def test_a_wrong_code_shows_the_message_in_place(browser_page, daphne_server, alice):
    page = browser_page
    login_browser(page, daphne_server, alice)
    page.goto(daphne_server.url + "/pair")
    page.locator("input[name=code]").press_sequentially("zzzzzz")
    page.get_by_role("button", name="Continue").click()
    page.get_by_text("That code is unknown or was already used.").wait_for()
    assert Island.objects.count() == 0
