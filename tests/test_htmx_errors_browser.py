"""Error answers to htmx requests in a real browser, with DEBUG on and off.

With DEBUG on (`make run`) django-htmx adds a script that replaces the whole
page with any 400/403/404/500 answer; pytest-django's client always runs
with DEBUG off, so only a browser against daphne in both modes sees it.
"""

import pytest
from django.contrib.sessions.models import Session

from islands.models import Island
from tests.conftest import login_browser


def assert_whole_page(page, title: str) -> None:
    """The page still has its title, its one header and its styles."""
    assert page.title() == f"{title} · Archipelag.io"
    assert page.locator("header.topbar").count() == 1
    assert page.get_by_role("link", name="Archipelag.io Islands").is_visible()
    # app.css applied: the header is a flex row, not an unstyled block.
    assert page.locator("header.topbar").evaluate("el => getComputedStyle(el).display") == "flex"


@pytest.mark.browser
def test_pair_form_errors_render_inside_the_form(browser_page, live_server_debug, alice):
    page = browser_page
    login_browser(page, live_server_debug, alice)
    page.goto(live_server_debug.url + "/pair")

    page.get_by_role("button", name="Continue").click()  # empty
    page.get_by_text("Enter the 6-character code").wait_for()
    assert_whole_page(page, "Pair an Island")
    assert page.locator("#pair-step form input[name=code]").count() == 1

    page.locator("input[name=code]").fill("ZZZZZZ")  # unknown
    page.get_by_role("button", name="Continue").click()
    page.get_by_text("That code is unknown or was already used.").wait_for()
    assert_whole_page(page, "Pair an Island")
    assert page.url == live_server_debug.url + "/pair"
    assert Island.objects.count() == 0


@pytest.mark.browser
def test_a_refused_csrf_token_gives_one_message_and_keeps_the_page(browser_page, live_server_debug, alice):
    page = browser_page
    login_browser(page, live_server_debug, alice)
    page.goto(live_server_debug.url + "/pair")
    page.context.clear_cookies(name="csrftoken")
    page.locator("input[name=code]").fill("ZZZZZZ")
    page.get_by_role("button", name="Continue").click()
    page.get_by_role("alert").filter(has_text="The server refused that request (403)").wait_for()
    assert_whole_page(page, "Pair an Island")
    # No swap: the form is still there, once, with what was typed.
    assert page.locator("input[name=code]").input_value() == "ZZZZZZ"
    assert page.get_by_role("heading", name="Pair an Island").count() == 1


@pytest.mark.browser
def test_refresh_after_the_session_ended_goes_to_the_login_page(browser_page, live_server_debug, alice):
    page = browser_page
    # Without the live list's own polls and socket, which would find the
    # session gone first (and rightly go to the login page themselves), so
    # that it is Refresh's answer this test follows.
    page.route("**/fleet_live*.js", lambda route: route.abort())
    login_browser(page, live_server_debug, alice)
    page.goto(live_server_debug.url + "/settings")
    Session.objects.all().delete()  # signed out elsewhere

    page.get_by_role("link", name="Refresh Islands").click()
    page.wait_for_url(live_server_debug.url + "/accounts/login/?next=/settings")
    assert_whole_page(page, "Log in")
    assert page.get_by_role("heading", name="Log in").count() == 1
    assert page.get_by_role("button", name="Log out alice").count() == 0


@pytest.mark.browser
def test_get_a_new_code_after_the_session_ended_goes_to_the_login_page(
    browser_page, live_server_debug, alice
):
    page = browser_page
    login_browser(page, live_server_debug, alice)
    page.goto(live_server_debug.url + "/pair/mobile")
    Session.objects.all().delete()
    renew = page.locator("[data-part=renew]")
    renew.evaluate("el => el.hidden = false")
    renew.get_by_role("button", name="Get a new code").click()
    page.wait_for_url(live_server_debug.url + "/accounts/login/?next=/pair/mobile")
    assert_whole_page(page, "Log in")
