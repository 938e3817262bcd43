"""/pair/mobile in a real browser (Playwright driving Debian's chromium) against daphne.

The phone is played by the test: it redeems the code it reads off the page
through the real mobile API, and the page must turn to "Paired" by itself.
With REDIS_URL set (CI's second run) the event crosses channels-redis.
"""

import re
import time

import pytest
import zxingcpp
from PIL import Image

from islands.models import Island
from pairing.models import MobilePairingSession
from simulator.desktop import Client as ApiClient
from tests.conftest import login_browser
from tests.pairing.conftest import IPHONE, MOBILE_PAIR, PHONE_HOST_ID

PAIRED = "Paired: iPhone 15 Pro (CoreML / ANE)"
SOCKET_URL = re.compile(r"/ws/pair/mobile/")


def open_page(page, server, user):
    login_browser(page, server, user)
    navigations = []
    page.on(
        "framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None
    )
    page.goto(server.url + "/pair/mobile")
    return navigations


def phone_redeems(server, code):
    status, body = ApiClient(server.url).post(
        MOBILE_PAIR, {"host_id": PHONE_HOST_ID, "device": IPHONE, "code": code}
    )
    assert status == 201, body
    return body


def time_until_paired(page, server, timeout_ms):
    """Redeem the code shown on the page and time how long "Paired" takes to show."""
    code = page.locator("[data-code]").inner_text()
    started = time.monotonic()
    body = phone_redeems(server, code)
    answered = time.monotonic()
    page.get_by_role("heading", name=PAIRED).wait_for(timeout=timeout_ms)
    shown = time.monotonic()
    return body, shown - started, shown - answered


@pytest.mark.browser
def test_the_page_turns_to_paired_over_the_websocket_within_two_seconds(browser_page, daphne_server, alice):
    page = browser_page
    navigations = open_page(page, daphne_server, alice)
    page.locator('#mobile-session[data-connection="live"]').wait_for()
    polls = []
    page.on("request", lambda request: polls.append(request.url) if "/status" in request.url else None)

    body, total, after_answer = time_until_paired(page, daphne_server, timeout_ms=2000)
    print(
        f"\n[websocket] Paired shown {total * 1000:.0f} ms after the phone sent its request "
        f"({after_answer * 1000:.0f} ms after the API answered)"
    )

    assert total < 2
    assert polls == [], "the websocket, not polling, must have delivered it"
    assert navigations == [daphne_server.url + "/pair/mobile"], "no reload"
    assert not page.locator("img.qr").is_visible()
    assert page.get_by_role("link", name="Your Islands").last.get_attribute("href") == "/settings"

    # "Not you?" unlinks the phone at once: its token stops working.
    island = Island.objects.get()
    assert Island.objects.authenticate(body["token"]) == island
    page.get_by_role("button", name="Not you? Remove this device").click()
    page.wait_for_url(daphne_server.url + "/settings")
    assert page.get_by_text("was removed. Its token no longer works.").is_visible()
    assert Island.objects.authenticate(body["token"]) is None
    assert Island.objects.get().removed_at is not None


@pytest.mark.browser
def test_with_the_websocket_blocked_the_page_reaches_paired_by_polling(browser_page, daphne_server, alice):
    page = browser_page
    # A proxy that refuses websockets: every attempt is closed at once.
    attempts = []

    def refuse(ws):
        attempts.append(ws.url)
        ws.close(code=1011)

    page.route_web_socket(SOCKET_URL, refuse)
    navigations = open_page(page, daphne_server, alice)
    page.locator('#mobile-session[data-connection="polling"]').wait_for()
    assert page.get_by_text("Live updates are unavailable").is_visible()

    _, total, after_answer = time_until_paired(page, daphne_server, timeout_ms=5000)
    print(
        f"\n[polling] Paired shown {total * 1000:.0f} ms after the phone sent its request "
        f"({after_answer * 1000:.0f} ms after the API answered)"
    )

    assert attempts, "the page must have tried the websocket"
    assert navigations == [daphne_server.url + "/pair/mobile"], "no reload"
    assert page.get_by_role("button", name="Not you? Remove this device").is_visible()


@pytest.mark.browser
def test_a_silent_socket_is_treated_as_down(browser_page, daphne_server, alice):
    """A socket that opens but never sends its snapshot (a buffering proxy) must not leave it waiting."""
    page = browser_page
    page.route_web_socket(SOCKET_URL, lambda ws: None)
    open_page(page, daphne_server, alice)
    page.locator('#mobile-session[data-connection="polling"]').wait_for(timeout=8000)
    _, total, _ = time_until_paired(page, daphne_server, timeout_ms=5000)
    assert total < 5


@pytest.mark.browser
def test_when_the_code_expires_a_new_one_comes_without_a_reload(browser_page, daphne_server, alice):
    page = browser_page
    page.clock.install()
    navigations = open_page(page, daphne_server, alice)
    page.locator('#mobile-session[data-connection="live"]').wait_for()
    first_code = page.locator("[data-code]").inner_text()
    first = MobilePairingSession.objects.get()
    # Ten minutes pass, for the server and for the page.
    MobilePairingSession.objects.filter(pk=first.pk).update(expires_at=first.created_at)
    page.clock.fast_forward("10:01")

    page.get_by_text("This code has expired.").wait_for()
    assert not page.locator("img.qr").is_visible()
    page.get_by_role("button", name="Get a new code").click()
    page.locator('#mobile-session[data-connection="live"]').wait_for()

    second_code = page.locator("[data-code]").inner_text()
    assert second_code != first_code
    assert page.locator("img.qr").is_visible()
    assert page.locator("[data-countdown]").inner_text() in {"10:00", "9:59"}
    assert navigations == [daphne_server.url + "/pair/mobile"], "no reload"
    assert MobilePairingSession.objects.get(pk=first.pk).retired_at is not None
    # And the fresh code pairs, live.
    phone_redeems(daphne_server, second_code)
    page.get_by_role("heading", name=PAIRED).wait_for(timeout=2000)


@pytest.mark.browser
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_qr_code_scans_off_the_screen_in_both_themes(
    browser_page, daphne_server, alice, scheme, tmp_path
):
    page = browser_page
    page.emulate_media(color_scheme=scheme)
    open_page(page, daphne_server, alice)
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == ("rgb(13, 17, 23)" if scheme == "dark" else "rgb(246, 247, 249)")
    shot = tmp_path / "qr.png"
    page.locator("img.qr").screenshot(path=str(shot))
    results = zxingcpp.read_barcodes(Image.open(shot))
    assert len(results) == 1
    code = page.locator("[data-code]").inner_text()
    assert f"/pair/mobile/scan#code={code}&secret=" in results[0].text
