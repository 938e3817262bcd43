"""The login page, in a real browser, with DEBUG on and off: wrong passwords, then the limit's message."""

import re

import pytest


@pytest.mark.browser
def test_the_eleventh_wrong_password_is_told_to_wait(browser_page, live_server_debug, alice):
    page = browser_page
    page.goto(live_server_debug.url + "/accounts/login/")

    def submit(password: str) -> int:
        page.get_by_label("Username").fill("alice")
        page.get_by_label("Password").fill(password)
        with page.expect_response(lambda response: response.request.method == "POST") as answer:
            page.get_by_role("button", name="Log in").click()
        page.wait_for_load_state()
        return int(answer.value.status)

    for _ in range(10):
        assert submit("not-her-password") == 200
        page.get_by_text("Please enter a correct username and password").wait_for()
    assert submit("still-not-her-password") == 429
    message = page.get_by_text(
        re.compile(r"Too many failed logins from this account\. Try again in \d+ minutes?\.")
    )
    message.wait_for()
    assert page.title() == "Log in · Archipelag.io"
    # What was typed is still there, on the site's own page, not an error page.
    assert page.get_by_label("Username").input_value() == "alice"
    assert page.locator(".brand").is_visible()
