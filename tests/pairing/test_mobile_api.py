"""POST /api/v1/mobile/pair: what the Archipelag.io app gets for every kind of request."""

import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.test import Client

from islands.models import MOBILE_TOKEN_TTL, Island
from pairing.models import MobilePairingSession
from tests.conftest import HOST_ID
from tests.pairing.conftest import IPHONE, MOBILE_PAIR, PHONE_HOST_ID, PIXEL, pair_phone

START = datetime(2026, 11, 20, 9, 0, 7, tzinfo=UTC)


def assert_nothing_written(session_id):
    assert Island.objects.count() == 0
    session = MobilePairingSession.objects.get(pk=session_id)
    assert session.used_at is None and session.island is None


def assert_nothing_written_but(existing, session_id):
    assert list(Island.objects.all()) == [existing]
    assert MobilePairingSession.objects.get(pk=session_id).used_at is None


# --- Success -------------------------------------------------------------------


def test_scanning_the_qr_secret_links_the_phone_and_returns_a_30_day_token(client, alice, open_session):
    with time_machine.travel(START, tick=False):
        opened = open_session(alice)
        response = pair_phone(client, secret=opened.secret)

    assert response.status_code == 201, response.json()
    body = response.json()
    island = Island.objects.get()
    assert body == {
        "success": True,
        "island_id": str(island.pk),
        "token": body["token"],
        "token_expires_at": (START + MOBILE_TOKEN_TTL).isoformat().replace("+00:00", "Z"),
        "account": "a***e",
    }
    assert Island.objects.authenticate(body["token"], now=START + timedelta(days=29)) == island
    assert Island.objects.authenticate(body["token"], now=START + timedelta(days=31)) is None
    assert island.owner == alice
    assert island.kind == Island.Kind.MOBILE
    assert island.host_id == PHONE_HOST_ID
    assert (island.platform, island.device_model, island.os_version) == ("ios", "iPhone 15 Pro", "18.1")
    assert (island.runtime, island.accelerator, island.cpu_cores, island.ram_mb) == ("coreml", "ane", 6, 8192)
    session = MobilePairingSession.objects.get(pk=opened.row.pk)
    assert session.used_at == START
    assert session.island == island
    assert session.redeemed_via == MobilePairingSession.Method.SECRET
    assert session.redeemed_ip == "127.0.0.1"


def test_typing_the_code_links_the_phone_and_is_forgiving_about_case_and_look_alikes(
    client, alice, open_session
):
    opened = open_session(alice)
    typed = f"{opened.code[:3].lower()}-{opened.code[3:].lower()}".replace("0", "o").replace("1", "l")
    response = pair_phone(client, code=typed, phone=PIXEL)
    assert response.status_code == 201, response.json()
    island = Island.objects.get(pk=response.json()["island_id"])
    assert (island.platform, island.runtime, island.accelerator) == ("android", "onnx", "nnapi")
    assert MobilePairingSession.objects.get().redeemed_via == MobilePairingSession.Method.CODE


def test_optional_device_fields_may_be_null_or_absent_and_unknown_ones_are_ignored(
    client, alice, open_session
):
    opened = open_session(alice)
    phone = {"platform": "ios", "model": "iPhone SE", "runtime": "coreml", "os_version": None, "battery": 80}
    response = pair_phone(client, secret=opened.secret, phone=phone)
    assert response.status_code == 201, response.json()
    island = Island.objects.get()
    assert (island.os_version, island.accelerator, island.cpu_cores, island.ram_mb) == ("", "", None, None)


def test_pairing_the_same_phone_again_replaces_its_token_instead_of_adding_an_island(
    client, alice, open_session
):
    first = pair_phone(client, secret=open_session(alice).secret).json()
    upgraded = {**IPHONE, "os_version": "19.0", "model": "iPhone 15 Pro Max"}
    second = pair_phone(client, secret=open_session(alice).secret, phone=upgraded).json()

    assert second["island_id"] == first["island_id"]
    assert second["token"] != first["token"]
    island = Island.objects.get()
    assert Island.objects.authenticate(first["token"]) is None
    assert Island.objects.authenticate(second["token"]) == island
    assert (island.device_model, island.os_version) == ("iPhone 15 Pro Max", "19.0")


# --- Refusals --------------------------------------------------------------------


def test_a_phone_linked_to_another_account_is_refused_and_the_code_stays_usable(
    client, alice, bob, open_session
):
    Island.objects.create(owner=bob, host_id=PHONE_HOST_ID, kind=Island.Kind.MOBILE)
    opened = open_session(alice)
    response = pair_phone(client, code=opened.code)
    assert response.status_code == 409
    assert response.json() == {
        "success": False,
        "error": "this phone is linked to another account; remove it there before pairing it with this one",
    }
    assert Island.objects.get().owner == bob
    assert MobilePairingSession.objects.get().used_at is None
    # Not a guess, so not counted; and the code still pairs another phone.
    assert pair_phone(client, code=opened.code, host_id="another-phone-0001").status_code == 201


def test_a_host_id_of_a_desktop_island_is_refused(client, alice, open_session):
    Island.objects.create(owner=alice, host_id=HOST_ID, kind=Island.Kind.DESKTOP, gpu_model="RTX 4090")
    opened = open_session(alice)
    response = pair_phone(client, host_id=HOST_ID, secret=opened.secret)
    assert response.status_code == 409
    assert "desktop" in response.json()["error"]
    assert Island.objects.get().kind == Island.Kind.DESKTOP
    assert_nothing_written_but(Island.objects.get(), opened.row.pk)


def test_unknown_and_used_codes_get_one_answer(client, alice, open_session):
    opened = open_session(alice)
    assert pair_phone(client, code=opened.code).status_code == 201
    used = pair_phone(client, code=opened.code, host_id="another-phone-0001")
    unknown = pair_phone(client, code="ZZZZZZ" if opened.code != "ZZZZZZ" else "YYYYYY")
    assert used.status_code == unknown.status_code == 401
    assert used.json() == unknown.json() == {"success": False, "error": "unknown or already used code"}
    assert Island.objects.count() == 1


def test_unknown_and_used_secrets_get_one_answer(client, alice, open_session):
    opened = open_session(alice)
    assert pair_phone(client, secret=opened.secret).status_code == 201
    used = pair_phone(client, secret=opened.secret, host_id="another-phone-0001")
    unknown = pair_phone(client, secret="x" * 43)
    assert used.status_code == unknown.status_code == 401
    assert used.json() == unknown.json() == {"success": False, "error": "unknown or already used QR code"}


def test_an_expired_code_says_so(client, alice, open_session):
    with time_machine.travel(START, tick=False):
        opened = open_session(alice)
    with time_machine.travel(START + timedelta(minutes=10), tick=False):
        by_code = pair_phone(client, code=opened.code)
        by_secret = pair_phone(client, secret=opened.secret)
    assert by_code.status_code == by_secret.status_code == 410
    assert "expired" in by_code.json()["error"]
    assert_nothing_written(opened.row.pk)


def test_a_code_still_works_just_before_it_expires(client, alice, open_session):
    with time_machine.travel(START, tick=False):
        opened = open_session(alice)
    with time_machine.travel(START + timedelta(minutes=10) - timedelta(seconds=1), tick=False):
        assert pair_phone(client, code=opened.code).status_code == 201


def test_opening_a_new_session_retires_the_earlier_one(client, alice, open_session):
    earlier = open_session(alice)
    newer = open_session(alice)
    assert pair_phone(client, code=earlier.code).status_code == 401
    assert pair_phone(client, secret=earlier.secret).status_code == 401
    assert pair_phone(client, secret=newer.secret).status_code == 201


def test_sessions_of_different_accounts_live_side_by_side(client, alice, bob, open_session):
    alices = open_session(alice)
    bobs = open_session(bob)
    assert pair_phone(client, secret=alices.secret).status_code == 201
    assert pair_phone(client, secret=bobs.secret, host_id="bobs-phone-00001").status_code == 201
    assert {island.owner for island in Island.objects.all()} == {alice, bob}


def test_desktop_and_mobile_codes_are_separate_namespaces(
    client, alice, alice_client, open_session, issue_code
):
    desktop = issue_code()
    assert pair_phone(client, code=desktop.code).status_code == 401
    mobile = open_session(alice)
    page = alice_client.post("/pair", {"code": mobile.code})
    assert "That code is unknown or was already used." in page.content.decode()
    assert Island.objects.count() == 0


def body(*, drop=(), device=None, **fields):
    """A request that is fine except for what the arguments change."""
    payload = {
        "host_id": "phone-00001",
        "device": {"platform": "ios", "model": "X", "runtime": "coreml", **(device or {})},
        "secret": "s",
        **fields,
    }
    for name in drop:
        del payload[name]
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    ("body", "status", "error_part"),
    [
        (b"", 400, "body is empty"),
        (b"not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "Expected `object`"),
        (body(drop=["device"]), 400, "missing required field `device`"),
        (body(drop=["host_id"]), 400, "missing required field `host_id`"),
        (body(host_id="bad id!"), 400, "invalid host_id"),
        (body(device={"platform": "windows"}), 400, "invalid device.platform"),
        (body(device={"runtime": "tensorrt"}), 400, "invalid device.runtime"),
        (body(device={"model": ""}), 400, "invalid device.model"),
        (body(device={"model": "m" * 129}), 400, "invalid device.model"),
        (body(device={"ram_mb": -1}), 400, "invalid device.ram_mb"),
        (body(device={"cpu_cores": "6"}), 400, "invalid device.cpu_cores"),
        (body(device={"accelerator": "a" * 33}), 400, "invalid device.accelerator"),
        (body(device={"model": "iPhone\x00"}), 400, "invalid device.model"),
        (body(device={"accelerator": "ane\x00"}), 400, "invalid device.accelerator"),
        (body(device={"os_version": "\x00"}), 400, "invalid device.os_version"),
        (body(drop=["secret"]), 400, "send either `code` or `secret`"),
        (body(code="A3X9K2"), 400, "send either `code` or `secret`"),
        (
            body(drop=["secret"], code="A3X9K"),
            400,
            "invalid code: A pairing code is exactly 6 letters and digits",
        ),
        (body(drop=["secret"], code="U3X9K2"), 400, "invalid code"),
        (body(secret="s" * 129), 400, "invalid secret"),
        (body(secret=""), 400, "invalid secret"),
        (body(padding="x" * 20000), 413, "body too large"),
    ],
)
def test_malformed_requests_are_refused_and_write_nothing(
    client, alice, open_session, body, status, error_part
):
    opened = open_session(alice)
    response = client.post(MOBILE_PAIR, body, content_type="application/json")
    assert response.status_code == status
    assert response.json()["success"] is False
    assert error_part in response.json()["error"]
    assert_nothing_written(opened.row.pk)


def test_only_post_is_allowed(client, db):
    response = client.get(MOBILE_PAIR)
    assert response.status_code == 405
    assert response["Allow"] == "POST"


def test_the_mobile_api_needs_no_csrf_token_or_cookie(alice, open_session):
    opened = open_session(alice)
    assert pair_phone(Client(enforce_csrf_checks=True), secret=opened.secret).status_code == 201


# --- Brute-force limits ------------------------------------------------------------


def wrong_code(opened):
    return "ZZZZZZ" if opened.code != "ZZZZZZ" else "YYYYYY"


def test_failed_codes_from_one_address_are_limited_even_for_the_right_code(client, alice, open_session):
    with time_machine.travel(START, tick=False):
        opened = open_session(alice)
        for _ in range(30):
            assert pair_phone(client, code=wrong_code(opened)).status_code == 401
        limited = pair_phone(client, code=opened.code)
        by_secret = pair_phone(client, secret=opened.secret)
        elsewhere = pair_phone(client, code=opened.code, REMOTE_ADDR="198.51.100.4")
    assert limited.status_code == by_secret.status_code == 429
    assert limited["Retry-After"] == str(3600 - 7)
    assert "too many wrong codes from this address; retry in 60 minutes" in limited.json()["error"]
    assert elsewhere.status_code == 201


def test_failed_secrets_count_per_address(client, alice, open_session):
    with time_machine.travel(START, tick=False):
        opened = open_session(alice)
        for n in range(30):
            assert pair_phone(client, secret=f"wrong-secret-{n}").status_code == 401
        assert pair_phone(client, secret=opened.secret).status_code == 429


def test_a_flood_from_twelve_addresses_does_not_lock_out_an_honest_new_account(
    client, alice, bob, open_session
):
    """Issue 14: 12 attacking addresses once filled a service-wide budget and locked everyone out."""
    with time_machine.travel(START, tick=False):
        opened = open_session(alice)
        for n in range(12):
            attacker = f"198.{n + 10}.100.7"
            statuses = [
                pair_phone(client, code=wrong_code(opened), REMOTE_ADDR=attacker).status_code
                for _ in range(40)
            ]
            assert statuses.count(401) == 30 and statuses.count(429) == 10
        honest = open_session(bob)
        response = pair_phone(client, code=honest.code, REMOTE_ADDR="203.0.113.50")
    assert response.status_code == 201, response.json()
    assert Island.objects.get().owner == bob


def test_failed_codes_are_limited_per_network_and_the_message_says_so(client, alice, open_session):
    with time_machine.travel(START, tick=False):
        opened = open_session(alice)
        for host in (1, 2, 3):
            for _ in range(30):
                assert (
                    pair_phone(client, code=wrong_code(opened), REMOTE_ADDR=f"192.0.2.{host}").status_code
                    == 401
                )
        neighbour = pair_phone(client, code=opened.code, REMOTE_ADDR="192.0.2.200")
        # Scanned secrets are not held back by a neighbour's typed guesses.
        assert pair_phone(client, secret=opened.secret, REMOTE_ADDR="192.0.2.201").status_code == 201
    assert neighbour.status_code == 429
    assert neighbour.json()["error"] == "too many wrong codes from your network; retry in 60 minutes"


def test_ipv6_addresses_are_counted_per_56(client, alice, open_session):
    with time_machine.travel(START, tick=False):
        opened = open_session(alice)
        for host in (1, 2, 3):
            addr = f"2001:db8:0:ff{host:02x}::1"  # three /64s in one /56
            for _ in range(30):
                assert pair_phone(client, code=wrong_code(opened), REMOTE_ADDR=addr).status_code == 401
        assert pair_phone(client, code=opened.code, REMOTE_ADDR="2001:db8:0:ffaa::9").status_code == 429
        assert pair_phone(client, code=opened.code, REMOTE_ADDR="2001:db8:0:100::9").status_code == 201


def test_successes_and_conflicts_are_not_counted(client, alice, bob, open_session):
    Island.objects.create(owner=bob, host_id="bobs-phone-00001", kind=Island.Kind.MOBILE)
    with time_machine.travel(START, tick=False):
        for _ in range(35):
            opened = open_session(alice)
            assert pair_phone(client, code=opened.code, host_id="bobs-phone-00001").status_code == 409
        assert pair_phone(client, code=opened.code).status_code == 201


# --- What is logged ------------------------------------------------------------------


def test_codes_secrets_and_tokens_are_never_logged(client, alice, open_session, caplog):
    caplog.set_level(logging.DEBUG)
    opened = open_session(alice)
    pair_phone(client, code=wrong_code(opened))
    token = pair_phone(client, secret=opened.secret).json()["token"]
    assert "event=island_linked channel=mobile via=secret" in caplog.text
    for secret in (opened.code, opened.secret, token):
        assert secret not in caplog.text
