from datetime import timedelta

import pytest
import time_machine
from django.test import Client
from django.utils import timezone

from islands.models import Island
from pairing.models import PairingCode
from tests.conftest import HOST_ID


def test_pair_requires_login(client, db):
    response = client.get("/pair")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/pair"


def test_the_code_input_upper_cases_and_accepts_one_time_codes(alice_client):
    html = alice_client.get("/pair").content.decode()
    assert 'name="code"' in html
    assert 'autocapitalize="characters"' in html
    assert 'autocomplete="one-time-code"' in html
    assert 'spellcheck="false"' in html
    assert "js/pair.js" in html


def test_a_valid_code_shows_what_will_be_linked_before_anything_happens(alice_client, issue_code):
    issued = issue_code()
    response = alice_client.post("/pair", {"code": issued.code.lower()})
    assert response.status_code == 200
    html = response.content.decode()
    assert "Link this Island to your account?" in html
    assert "RTX 4090, 24 GB VRAM" in html
    assert "16 cores" in html
    assert "64 GB" in html
    assert "0.5.0" in html
    assert "us-east" in html
    assert "203.0.113.7" in html
    assert HOST_ID in html
    assert ">Link Island</button>" in html
    assert ">Cancel</a>" in html
    # Looking is not linking.
    assert Island.objects.count() == 0
    assert PairingCode.objects.get().used_at is None


def test_confirming_links_the_island_and_lands_on_settings(alice, alice_client, issue_code):
    issued = issue_code()
    response = alice_client.post(
        "/pair/confirm", {"code": f"{issued.code[:3]}-{issued.code[3:]}"}, follow=True
    )
    assert response.redirect_chain == [("/settings", 302)]
    island = Island.objects.get()
    assert island.owner == alice
    assert island.host_id == HOST_ID
    assert island.gpu_model == "RTX 4090"
    assert island.cpu_cores == 16
    html = response.content.decode()
    assert "is now linked to your account" in html
    assert island.name in html
    assert PairingCode.objects.get().used_by == alice


def test_htmx_gets_only_the_step_and_a_redirect_on_success(alice_client, issue_code):
    issued = issue_code()
    step = alice_client.post("/pair", {"code": issued.code}, headers={"HX-Request": "true"})
    assert step.status_code == 200
    assert b"<html" not in step.content
    assert b'id="pair-step"' in step.content
    done = alice_client.post("/pair/confirm", {"code": issued.code}, headers={"HX-Request": "true"})
    assert done.status_code == 204
    assert done["HX-Redirect"] == "/settings"
    assert Island.objects.count() == 1


@pytest.mark.parametrize("typed", ["A3X9K", "A3X9K2Z", "U3X9K2", "!!!!!!", ""])
def test_malformed_input_gets_its_own_message(alice_client, db, typed):
    response = alice_client.post("/pair", {"code": typed})
    assert response.status_code == 422
    html = response.content.decode()
    assert "6" in html and ("letters and digits" in html or "Enter the 6-character code" in html)
    assert "unknown" not in html


def test_unknown_and_used_codes_get_one_message(alice_client, bob, issue_code):
    issued = issue_code()
    PairingCode.objects.find(issued.code).redeem(bob)
    unknown = alice_client.post("/pair", {"code": "ZZZZZZ" if issued.code != "ZZZZZZ" else "YYYYYY"})
    used = alice_client.post("/pair", {"code": issued.code})
    assert unknown.status_code == used.status_code == 422
    message = "That code is unknown or was already used."
    assert message in unknown.content.decode()
    assert message in used.content.decode()


def test_an_expired_code_says_so(alice_client, issue_code):
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        issued = issue_code()
    with time_machine.travel(start + timedelta(minutes=10), tick=False):
        response = alice_client.post("/pair", {"code": issued.code})
        confirm = alice_client.post("/pair/confirm", {"code": issued.code})
    assert "That code has expired." in response.content.decode()
    assert "That code has expired." in confirm.content.decode()
    assert Island.objects.count() == 0
    assert PairingCode.objects.get().used_at is None


def test_a_code_of_an_island_linked_to_another_account_is_refused(alice_client, bob, issue_code):
    issued = issue_code()
    # Bob linked the same host (through another code) after this one was drawn.
    Island.objects.create(owner=bob, host_id=HOST_ID)
    response = alice_client.post("/pair", {"code": issued.code})
    assert response.status_code == 409
    assert "already linked to another account" in response.content.decode()
    confirm = alice_client.post("/pair/confirm", {"code": issued.code})
    assert confirm.status_code == 409
    assert Island.objects.get().owner == bob
    assert PairingCode.objects.get().used_at is None


def test_a_mistyped_code_never_uses_up_the_right_one(alice, alice_client, issue_code):
    issued = issue_code()
    wrong = issued.code[:5] + ("0" if issued.code[5] != "0" else "1")
    assert alice_client.post("/pair/confirm", {"code": wrong}).status_code == 422
    assert alice_client.post("/pair/confirm", {"code": issued.code}).status_code == 302
    assert Island.objects.get().owner == alice


def test_a_code_redeems_once(alice_client, bob_client, issue_code):
    issued = issue_code()
    assert alice_client.post("/pair/confirm", {"code": issued.code}).status_code == 302
    second = bob_client.post("/pair/confirm", {"code": issued.code})
    assert second.status_code == 422
    assert "unknown or was already used" in second.content.decode()
    assert Island.objects.count() == 1


def test_the_forms_are_csrf_protected(alice, issue_code):
    issued = issue_code()
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice)
    assert strict.post("/pair", {"code": issued.code}).status_code == 403
    assert strict.post("/pair/confirm", {"code": issued.code}).status_code == 403
    assert Island.objects.count() == 0


def test_confirm_only_accepts_post(alice_client):
    assert alice_client.get("/pair/confirm").status_code == 405


def test_codes_never_appear_in_logs(alice_client, issue_code, caplog, client):
    caplog.set_level("DEBUG")
    response = client.post(
        "/api/v1/islands/pairing", {"host_id": "host-logs-0001"}, content_type="application/json"
    )
    code = response.json()["code"]
    secret = response.json()["device_secret"]
    alice_client.post("/pair", {"code": code})
    alice_client.post("/pair/confirm", {"code": code})
    assert "event=island_linked" in caplog.text
    assert code not in caplog.text
    assert secret not in caplog.text
