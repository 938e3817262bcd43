"""/pair/mobile, its status URL and its QR code, as the signed-in person sees them."""

import base64
import io
import re
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import time_machine
import zxingcpp
from django.core.management import call_command
from django.utils import timezone
from PIL import Image

from archipelag.secrets import hash_secret
from islands.models import Island
from pairing.codes import hash_code
from pairing.models import MobilePairingSession
from tests.conftest import admin_column as column
from tests.pairing.conftest import pair_phone

QR_IMG = re.compile(r'<img class="qr" src="data:image/png;base64,([^"]+)"')
CODE = re.compile(r"<p class=\"pair-code\" data-code>([0-9A-Z]{6})</p>")


def qr_image(html: str) -> Image.Image:
    match = QR_IMG.search(html)
    assert match, "no inline PNG QR code on the page"
    return Image.open(io.BytesIO(base64.b64decode(match.group(1)))).convert("L")


def decode_qr(image: Image.Image) -> str:
    results = zxingcpp.read_barcodes(image)
    assert [r.format for r in results] == [zxingcpp.BarcodeFormat.QRCode], results
    return results[0].text


def shown_code(html: str) -> str:
    match = CODE.search(html)
    assert match, "no pairing code on the page"
    return match.group(1)


def test_pair_mobile_requires_login(client, db):
    response = client.get("/pair/mobile")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/pair/mobile"
    assert MobilePairingSession.objects.count() == 0


def test_the_page_opens_a_session_and_shows_its_code_countdown_and_live_hooks(alice, alice_client):
    response = alice_client.get("/pair/mobile")
    assert response.status_code == 200
    html = response.content.decode()
    session = MobilePairingSession.objects.get()
    assert session.owner == alice
    code = shown_code(html)
    assert session.code_hash == hash_code(code)
    assert "Expires in <span data-countdown>10:00</span>" in html
    assert f'data-mobile-session="{session.id}"' in html
    assert f'data-socket-path="/ws/pair/mobile/{session.id}/"' in html
    assert f'data-status-url="/pair/mobile/{session.id}/status"' in html
    assert "js/pair_mobile.js" in html
    # The page carries a live credential: no cache may keep it.
    assert "no-store" in response["Cache-Control"]


def test_the_qr_code_decodes_to_the_scan_url_with_the_code_and_the_secret(alice_client, settings):
    settings.PUBLIC_URL = "https://islands.example.org"
    html = alice_client.get("/pair/mobile").content.decode()
    payload = decode_qr(qr_image(html))

    url = urlsplit(payload)
    assert (url.scheme, url.netloc, url.path, url.query) == (
        "https",
        "islands.example.org",
        "/pair/mobile/scan",
        "",
    )
    fragment = parse_qs(url.fragment, strict_parsing=True)
    assert set(fragment) == {"code", "secret"}
    assert fragment["code"] == [shown_code(html)]
    secret = fragment["secret"][0]
    assert len(base64.urlsafe_b64decode(secret + "==")) * 8 >= 128
    session = MobilePairingSession.objects.get()
    assert session.scan_secret_hash == hash_secret(secret)
    # Only hashes are stored.
    assert secret not in session.scan_secret_hash and fragment["code"][0] not in session.code_hash


def test_the_decoded_qr_secret_pairs_a_phone(client, alice_client):
    html = alice_client.get("/pair/mobile").content.decode()
    secret = parse_qs(urlsplit(decode_qr(qr_image(html))).fragment)["secret"][0]
    assert pair_phone(client, secret=secret).status_code == 201


def test_the_qr_code_is_dark_on_light_with_a_quiet_zone(alice_client):
    image = qr_image(alice_client.get("/pair/mobile").content.decode())
    width, height = image.size
    assert width == height
    pixels = image.load()
    assert pixels is not None
    colours = {pixels[x, y] for x in range(width) for y in range(height)}
    assert colours == {0, 255}
    # The finder pattern's top-left corner is the first dark pixel; everything
    # before it, a band of 4 modules, is light.
    first_dark = next(i for i in range(width) if pixels[i, i] == 0)
    module = 6
    assert first_dark == 4 * module
    band = [
        pixels[x, y]
        for x in range(width)
        for y in range(height)
        if min(x, y, width - 1 - x, height - 1 - y) < 4 * module
    ]
    assert set(band) == {255}


def test_each_load_opens_a_fresh_session_and_retires_the_earlier_one(alice_client):
    first = shown_code(alice_client.get("/pair/mobile").content.decode())
    second = shown_code(alice_client.get("/pair/mobile").content.decode())
    assert first != second
    now = timezone.now()
    states = {s.code_hash: s.state(now) for s in MobilePairingSession.objects.all()}
    assert states == {hash_code(first): "retired", hash_code(second): "live"}


def test_get_a_new_code_with_htmx_swaps_in_only_the_session(alice_client):
    first = shown_code(alice_client.get("/pair/mobile").content.decode())
    response = alice_client.post("/pair/mobile", headers={"HX-Request": "true"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html
    assert html.lstrip().startswith('<div id="mobile-session"')
    assert shown_code(html) != first
    assert QR_IMG.search(html)
    assert 'hx-post="/pair/mobile"' in html


def test_the_new_code_button_works_without_javascript_too(alice_client):
    response = alice_client.post("/pair/mobile")
    assert response.status_code == 200
    assert "<html" in response.content.decode()
    assert MobilePairingSession.objects.count() == 1


def test_opening_sessions_is_limited_per_account(alice_client, bob_client):
    start = timezone.now().replace(minute=0, second=1)
    with time_machine.travel(start, tick=False):
        for _ in range(30):
            assert alice_client.get("/pair/mobile").status_code == 200
        limited = alice_client.post("/pair/mobile", headers={"HX-Request": "true"})
        assert bob_client.get("/pair/mobile").status_code == 200
    assert limited.status_code == 429
    assert limited["Retry-After"] == str(3600 - 1)
    html = limited.content.decode()
    assert "You opened many pairing codes in a short time. Try again in 60 minutes." in html
    assert "Get a new code" in html
    assert MobilePairingSession.objects.filter(owner__username="alice").count() == 30


# --- The status URL the page polls ------------------------------------------------


def status(client, session_id):
    return client.get(f"/pair/mobile/{session_id}/status")


def test_status_follows_the_session_from_waiting_to_paired(alice, alice_client, client, open_session):
    opened = open_session(alice)
    waiting = status(alice_client, opened.row.id)
    assert waiting.status_code == 200
    assert "no-store" in waiting["Cache-Control"]
    assert waiting.json()["state"] == "waiting"
    assert 595 <= waiting.json()["expires_in_seconds"] <= 600
    assert opened.secret not in waiting.content.decode()

    assert pair_phone(client, secret=opened.secret).status_code == 201
    paired = status(alice_client, opened.row.id).json()
    island = Island.objects.get()
    assert paired["state"] == "paired"
    assert paired["island"]["label"] == "iPhone 15 Pro (CoreML / ANE)"
    assert paired["island"]["remove_url"] == f"/settings/islands/{island.pk}/remove"


def test_status_says_expired_and_replaced(alice, alice_client, open_session):
    old = open_session(alice)
    new = open_session(alice)
    assert status(alice_client, old.row.id).json() == {
        "state": "expired",
        "session_id": str(old.row.id),
        "reason": "replaced",
    }
    with time_machine.travel(timezone.now() + timedelta(minutes=11), tick=False):
        assert status(alice_client, new.row.id).json()["reason"] == "expired"


def test_status_is_for_the_owner_only(alice, bob_client, client, open_session):
    opened = open_session(alice)
    assert status(bob_client, opened.row.id).status_code == 404
    assert status(bob_client, "00000000-0000-4000-8000-000000000000").status_code == 404
    anonymous = status(client, opened.row.id)
    assert anonymous.status_code == 401
    assert anonymous.json() == {"success": False, "error": "sign in again"}


def test_removing_the_paired_phone_from_the_page_stops_its_token(alice, alice_client, client, open_session):
    opened = open_session(alice)
    token = pair_phone(client, secret=opened.secret).json()["token"]
    remove_url = status(alice_client, opened.row.id).json()["island"]["remove_url"]
    response = alice_client.post(remove_url, follow=True)
    assert response.redirect_chain == [("/settings", 302)]
    assert Island.objects.authenticate(token) is None
    assert status(alice_client, opened.row.id).json()["island"]["removed"] is True


def test_signing_out_ends_the_code_shown_so_the_phone_is_refused(alice, alice_client, client):
    html = alice_client.get("/pair/mobile").content.decode()
    code = shown_code(html)
    session = MobilePairingSession.objects.get()

    assert alice_client.post("/accounts/logout/").status_code == 302
    response = pair_phone(client, code=code)

    assert response.status_code == 401
    assert response.json() == {"success": False, "error": "unknown or already used code"}
    assert Island.objects.count() == 0
    session.refresh_from_db()
    assert session.used_at is None and session.retired_at is not None


def test_signing_out_leaves_other_accounts_sessions_alone(alice, bob, alice_client, client, open_session):
    bobs = open_session(bob)
    alice_client.get("/pair/mobile")
    alice_client.post("/accounts/logout/")
    assert pair_phone(client, secret=bobs.secret).status_code == 201
    assert Island.objects.get().owner == bob


# --- Around the page --------------------------------------------------------------------


def test_the_scan_url_explains_itself_to_a_phone_camera_without_login(client, db):
    response = client.get("/pair/mobile/scan")
    assert response.status_code == 200
    assert "Scan this code with the Archipelag.io app" in response.content.decode()


def test_the_pair_page_points_to_mobile_pairing(alice_client):
    assert 'href="/pair/mobile"' in alice_client.get("/pair").content.decode()


def test_the_admin_lists_sessions_without_their_secrets(alice, open_session, admin_client):
    opened = open_session(alice)
    admin = admin_client
    listing = admin.get("/admin/pairing/mobilepairingsession/").content.decode()
    assert column(listing, "owner") == ["alice"]
    assert column(listing, "state") == ["live"]
    page = admin.get(f"/admin/pairing/mobilepairingsession/{opened.row.pk}/change/").content.decode()
    assert f"{opened.row.scan_secret_hash[:8]}…" in page
    for secret in (opened.code, opened.secret, opened.row.code_hash, opened.row.scan_secret_hash):
        assert secret not in page
    assert admin.get("/admin/pairing/mobilepairingsession/add/").status_code == 403


def test_prune_deletes_old_mobile_sessions(alice, open_session):
    with time_machine.travel(timezone.now() - timedelta(days=8), tick=False):
        open_session(alice)
    fresh = open_session(alice)
    call_command("prune_pairing_codes", "--days", "7")
    assert list(MobilePairingSession.objects.values_list("pk", flat=True)) == [fresh.row.pk]
