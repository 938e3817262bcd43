import re

import pytest
from django.contrib.auth.models import User
from django.core import mail
from django.db import IntegrityError, transaction

from notify.models import EmailAddress
from tests.conftest import PASSWORD

LINK = re.compile(r"http://testserver\.example/\S+")


@pytest.fixture(autouse=True)
def _public_url(settings):
    settings.PUBLIC_URL = "http://testserver.example"


def _signup(client, username="carol", email="carol@example.com"):
    return client.post(
        "/accounts/signup/",
        {"username": username, "email": email, "password1": PASSWORD, "password2": PASSWORD},
    )


def _link(message) -> str:
    match = LINK.search(message.body)
    assert match, message.body
    return match.group(0).removeprefix("http://testserver.example")


def test_signup_sends_a_confirmation_link_on_public_url_and_get_confirms(
    client, db, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = _signup(client)
    assert response.status_code == 302
    address = EmailAddress.objects.get()
    assert address.email == "carol@example.com" and address.confirmed_at is None
    # User.email holds confirmed addresses only: password reset looks there.
    assert User.objects.get().email == ""
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == ["carol@example.com"]
    page = client.get("/settings").content.decode()
    assert "Waiting for confirmation: <strong>carol@example.com</strong>" in page

    client.logout()  # the link works from any browser, logged in or not
    response = client.get(_link(mail.outbox[0]))
    assert response.status_code == 200
    assert "Email confirmed" in response.content.decode()
    assert EmailAddress.objects.get().confirmed_at is not None
    assert User.objects.get().email == "carol@example.com"
    # Opening it again (a mail scanner, a second click) changes nothing.
    assert "Already confirmed" in client.get(_link(mail.outbox[0])).content.decode()


def test_signup_without_email_is_refused(client, db):
    response = client.post(
        "/accounts/signup/", {"username": "carol", "password1": PASSWORD, "password2": PASSWORD}
    )
    assert response.status_code == 400
    assert "This field is required." in response.content.decode()
    assert User.objects.count() == 0


def test_a_confirmed_address_is_unique_whatever_the_case(client, db):
    bob = User.objects.create_user("bob", password=PASSWORD)
    EmailAddress.objects.create(user=bob, email="Carol@Example.com", confirmed_at="2026-01-01T00:00Z")
    response = _signup(client, email="carol@EXAMPLE.com")
    assert response.status_code == 400
    assert "Another account uses this address." in response.content.decode()
    assert not User.objects.filter(username="carol").exists()
    # The database refuses it too, whatever the form says.
    dave = User.objects.create_user("dave", password=PASSWORD)
    with pytest.raises(IntegrityError), transaction.atomic():
        EmailAddress.objects.create(user=dave, email="CAROL@example.COM", confirmed_at="2026-01-02T00:00Z")


def test_a_typed_but_unconfirmed_address_reserves_nothing(client, db, django_capture_on_commit_callbacks):
    squatter = User.objects.create_user("mallory", password=PASSWORD)
    EmailAddress.objects.create(user=squatter, email="carol@example.com")
    with django_capture_on_commit_callbacks(execute=True):
        assert _signup(client).status_code == 302
    client.get(_link(mail.outbox[-1]))
    carol = User.objects.get(username="carol")
    assert carol.email == "carol@example.com"
    # Whoever confirms second is told the address is taken.
    squatters_link = (
        f"/accounts/email/confirm/{EmailAddress.objects.get(user=squatter).confirmation_token()}/"
    )
    response = client.get(squatters_link)
    assert response.status_code == 400
    assert "Another account confirmed" in response.content.decode()
    assert EmailAddress.objects.get(user=squatter).confirmed_at is None


def test_a_forged_or_expired_link_confirms_nothing(client, db, time_machine):
    user = User.objects.create_user("carol", password=PASSWORD)
    time_machine.move_to("2026-01-01T00:00Z")
    address = EmailAddress.objects.create(user=user, email="carol@example.com")
    token = address.confirmation_token()
    assert client.get(f"/accounts/email/confirm/{token}x/").status_code == 400
    time_machine.move_to("2026-01-05T00:00Z")
    response = client.get(f"/accounts/email/confirm/{token}/")
    assert response.status_code == 400
    assert "This link does not work" in response.content.decode()
    assert EmailAddress.objects.get().confirmed_at is None


def test_an_existing_account_adds_an_email_on_settings(client, alice, django_capture_on_commit_callbacks):
    client.force_login(alice)
    page = client.get("/settings").content.decode()
    assert "Add an email address" in page
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/accounts/email/", {"email": "alice@example.com"}, follow=True)
    assert "We sent a confirmation link to alice@example.com." in response.content.decode()
    client.get(_link(mail.outbox[0]))
    page = client.get("/settings").content.decode()
    assert "Alerts and password resets go to <strong>alice@example.com</strong>" in page
    assert User.objects.get(pk=alice.pk).email == "alice@example.com"


def test_a_bad_address_on_settings_shows_an_error(client, alice):
    client.force_login(alice)
    response = client.post("/accounts/email/", {"email": "not-an-address"}, follow=True)
    assert "Email: Enter a valid email address." in response.content.decode()
    assert EmailAddress.objects.count() == 0


def test_confirmation_emails_are_throttled_per_address(client, alice, django_capture_on_commit_callbacks):
    client.force_login(alice)
    with django_capture_on_commit_callbacks(execute=True):
        client.post("/accounts/email/", {"email": "alice@example.com"})
        for _ in range(4):
            response = client.post("/accounts/email/resend", follow=True)
    assert len(mail.outbox) == 3
    assert "Too many confirmation emails for this address" in response.content.decode()


def test_password_reset_goes_to_the_confirmed_address_with_a_public_url(client, alice):
    EmailAddress.objects.create(user=alice, email="alice@example.com", confirmed_at="2026-01-01T00:00Z")
    User.objects.filter(pk=alice.pk).update(email="alice@example.com")
    response = client.post("/accounts/password_reset/", {"email": "ALICE@example.com"})
    assert response.status_code == 302
    assert len(mail.outbox) == 1
    link = _link(mail.outbox[0])
    response = client.get(link, follow=True)
    assert "Choose a new password" in response.content.decode()
    response = client.post(
        response.redirect_chain[-1][0],
        {"new_password1": "another-long-passphrase-42", "new_password2": "another-long-passphrase-42"},
        follow=True,
    )
    assert "Password changed" in response.content.decode()
    assert User.objects.get(pk=alice.pk).check_password("another-long-passphrase-42")


def test_password_reset_sends_nothing_to_an_unconfirmed_address(client, alice):
    EmailAddress.objects.create(user=alice, email="alice@example.com")
    response = client.post("/accounts/password_reset/", {"email": "alice@example.com"})
    assert response.status_code == 302
    assert mail.outbox == []


def test_password_reset_is_throttled_per_address(client, alice):
    User.objects.filter(pk=alice.pk).update(email="alice@example.com")
    for _ in range(3):
        assert client.post("/accounts/password_reset/", {"email": "alice@example.com"}).status_code == 302
    response = client.post("/accounts/password_reset/", {"email": "alice@example.com"})
    assert response.status_code == 429
    assert "Too many reset emails for this address" in response.content.decode()
    assert len(mail.outbox) == 3
