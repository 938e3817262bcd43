"""Every page a first visit meets, in a real browser, with DEBUG on and off.

Each test walks the same page states (`walk`): signed out, then signed in
with no Islands, then with Islands whose names and reasons are long. At
each state it checks the page as a person meets it: nothing wider than
the window at 1280 and 390 px, and no serious or critical axe-core
violation.
"""

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from islands.models import Island
from karma.models import KarmaEvent
from tests.conftest import PASSWORD, login_browser
from tests.islands.conftest import make_island

LONG_NAME = "Workstation-" + "x" * 88  # 100 characters, no space to break at


def walk(page, server, alice, newcomer: str, issue_code) -> Iterator[str]:
    """Go through the page states one by one; yield each one's name while it is shown."""
    url = server.url
    page.goto(url + "/")
    yield "home"
    page.goto(url + "/accounts/login/")
    yield "login"
    page.goto(url + "/accounts/password_reset/")
    yield "password reset"
    page.goto(url + "/accounts/signup/")
    yield "signup"
    page.get_by_label("Username").fill(newcomer)
    page.get_by_label("Email").fill(f"{newcomer}@example.org")
    page.locator("#id_password1").fill("a")
    page.locator("#id_password2").fill("b")
    page.get_by_role("button", name="Create account").click()
    page.get_by_text("The two password fields didn’t match.").wait_for()
    yield "signup with errors"
    page.locator("#id_password1").fill(PASSWORD)
    page.locator("#id_password2").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    page.wait_for_url(url + "/settings")
    yield "settings, no Islands, with a message"
    page.context.clear_cookies()
    if not server.debug:
        # With DEBUG on a 404 is Django's technical page, not the site's.
        page.goto(url + "/no-such-page")
        yield "404"
    login_browser(page, server, alice)
    page.goto(url + "/pair")
    yield "pair"
    page.get_by_role("button", name="Continue").click()
    page.get_by_text("Enter the 6-character code").wait_for()
    yield "pair with errors"
    issued = issue_code(f"walk-host-{newcomer}")
    page.locator("input[name=code]").fill(issued.code)
    page.get_by_role("button", name="Continue").click()
    page.get_by_text("Link this Island to your account?").wait_for()
    yield "pair, confirming a code"
    page.get_by_role("button", name="Link Island").click()
    page.wait_for_url(url + "/settings")
    yield "settings, an Island just linked"
    page.goto(url + "/pair")
    page.get_by_role("button", name="Make keys").click()
    page.get_by_role("heading", name="Your Island key").wait_for()
    yield "Island keys, shown once"
    page.goto(url + "/pair/mobile")
    yield "pair from a phone"
    island = _islands(alice)
    page.goto(url + "/settings")
    yield "settings with Islands"
    page.goto(url + "/settings?view=table")
    yield "settings as a table"
    page.goto(url + f"/settings/islands/{island.pk}")
    yield "an Island's page"
    page.goto(url + "/reference/karma")
    yield "karma reference"
    page.goto(url + "/settings/notifications")
    yield "notification settings"


def _islands(alice):
    existing = Island.objects.filter(owner=alice, name=LONG_NAME).first()
    if existing:
        return existing
    now = timezone.now()
    # The longest name and host id the database holds (100 and 64 characters).
    long = make_island(alice, name=LONG_NAME, host_id="host-" + "0" * 59)
    make_island(alice, name="Garage rig", host_id="garage-rig", last_heartbeat_at=now)
    for minutes in range(3):
        KarmaEvent.objects.adjust(
            long,
            Decimal(-1),
            "A long reason that keeps going: " + "supercalifragilistic" * 6,
            by=None,
            now=now - timedelta(minutes=minutes),
        )
    return long


# The page's width and, when it is wider than the window, the innermost
# elements that reach past the window's right edge (for the failure message).
OVERFLOW = """() => {
  const scroll = document.scrollingElement.scrollWidth, width = window.innerWidth;
  const past = scroll <= width ? [] : [...document.body.querySelectorAll("*")].filter(
    el => el.getBoundingClientRect().right > width + 1 && el.children.length === 0
  ).slice(0, 3).map(el => el.tagName.toLowerCase() + (el.className ? "." + el.className : ""));
  return {scroll, width, past};
}"""


TITLES = {
    "home": "Welcome · Archipelag.io",
    "login": "Log in · Archipelag.io",
    "signup": "Sign up · Archipelag.io",
    "signup with errors": "Sign up · Archipelag.io",
    "404": "Page not found · Archipelag.io",
    "pair": "Pair an Island · Archipelag.io",
    "karma reference": "Karma · Archipelag.io",
}


@pytest.mark.browser
def test_no_page_is_wider_than_the_window(browser_page, live_server_debug, alice, issue_code):
    """Nor misses a file it loads (the favicon was a 404 on every page), nor has a stray title."""
    page = browser_page
    wide = []
    missing = []

    def note_missing(response) -> None:
        # Pages and htmx's form answers may be errors; the files a page loads may not.
        if response.status >= 400 and response.request.resource_type not in ("document", "xhr", "fetch"):
            missing.append(f"{response.status} {response.url}")

    page.on("response", note_missing)
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 900})
        page.context.clear_cookies()
        for state in walk(page, live_server_debug, alice, f"carol{width}", issue_code):
            size = page.evaluate(OVERFLOW)
            if size["scroll"] > size["width"]:
                wide.append(f"{state} at {width} px: {size['scroll']} px wide, past the edge: {size['past']}")
            if state in TITLES:
                assert page.title() == TITLES[state]
    assert page.evaluate("() => document.querySelector('link[rel=icon]').href").endswith(".svg")
    assert missing == []
    assert wide == [], "\n".join(wide)


@pytest.mark.browser
def test_no_page_has_a_serious_accessibility_violation(
    browser_page, live_server_debug, alice, issue_code, axe
):
    """axe-core (.ci/run installs it) on every state of the walk, at 1280 and 390 px, and dark at 1280."""
    page = browser_page
    found = []
    for width, scheme in ((1280, "light"), (390, "light"), (1280, "dark")):
        page.set_viewport_size({"width": width, "height": 900})
        page.emulate_media(color_scheme=scheme)
        page.context.clear_cookies()
        for state in walk(page, live_server_debug, alice, f"dave{width}{scheme}", issue_code):
            found += [f"{state} at {width} px, {scheme}: {violation}" for violation in axe(page)]
    assert found == [], "\n".join(found)


# Every violation of the page's Content-Security-Policy, as the browser reports it to the page.
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.violatedDirective} blocked ${event.blockedURI || "inline"}`);
});
"""


@pytest.mark.browser
def test_no_page_breaks_its_content_security_policy(browser_page, live_server_debug, alice, issue_code):
    """Pages, htmx's swaps, the QR code and the pairing websocket all work under the policy."""
    page = browser_page
    page.add_init_script(RECORD_CSP_VIOLATIONS)
    console = []
    page.on("console", lambda message: console.append(message.text))
    page.on("pageerror", lambda error: console.append(f"page error: {error}"))
    found = []
    for state in walk(page, live_server_debug, alice, "erin", issue_code):
        found += [f"{state}: {violation}" for violation in page.evaluate("window.__cspViolations")]
        if state == "pair from a phone":
            # The QR code (a data: image) shows, and the websocket goes live.
            assert page.locator("img.qr").evaluate("img => img.complete && img.naturalWidth > 0")
            page.locator('#mobile-session[data-connection="live"]').wait_for(timeout=15_000)
    response = page.goto(live_server_debug.url + "/settings")
    assert response is not None
    assert "script-src 'self'" in response.headers["content-security-policy"]
    # Removing asks first (a data-confirm form, not an inline onsubmit); dismissed, nothing is removed.
    asked = []

    def dismiss(dialog) -> None:
        asked.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", dismiss)
    page.get_by_role("button", name="Remove").first.click()
    assert asked == ["Remove this Island? Its token stops working at once."]
    assert not Island.objects.filter(owner=alice, removed_at__isnull=False).exists()
    found += [f"settings, removing: {violation}" for violation in page.evaluate("window.__cspViolations")]
    # The admin too: its index and a changelist with actions, filters and search.
    login_browser(page, live_server_debug, User.objects.create_superuser("root", password=PASSWORD))
    for path in ("/admin/", "/admin/islands/island/", f"/admin/islands/island/{_islands(alice).pk}/change/"):
        page.goto(live_server_debug.url + path)
        found += [f"{path}: {violation}" for violation in page.evaluate("window.__cspViolations")]
    assert found == [], "\n".join(found)
    assert [text for text in console if "Content Security Policy" in text or "page error" in text] == []
