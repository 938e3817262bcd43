"""Webhooks: added on /settings/notifications, signed per Standard Webhooks (checked with its
reference library), retried, paused after about an hour, and never sent where they must not go."""

import json
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone
from standardwebhooks.webhooks import Webhook

from notify import webhooks
from notify.models import MAX_ATTEMPTS, Delivery, Notification, WebhookEndpoint
from notify.sender import send_due
from tests.notify.conftest import body

ALL_EVENTS = ["island.offline", "island.online", "island.linked", "island.karma_level"]


def add_endpoint(client, url, events=ALL_EVENTS):
    return client.post("/settings/notifications/webhooks", {"url": url, "events": events})


def shown_secret(response):
    page = response.content.decode()
    start = page.index("whsec_")
    return page[start : page.index("<", start)]


def test_adding_an_endpoint_shows_its_secret_once_and_keeps_it_encrypted(alice_client, alice, receiver):
    response = add_endpoint(alice_client, f"{receiver.url}/hook")
    assert response.status_code == 200
    secret = shown_secret(response)
    endpoint = WebhookEndpoint.objects.get(user=alice)
    assert endpoint.events == sorted(ALL_EVENTS)
    assert secret not in endpoint.secret_encrypted and endpoint.secret() == secret
    # Never again: the settings page shows the endpoint, not its secret.
    assert "whsec_" not in alice_client.get("/settings/notifications").content.decode()


def test_a_rotated_secret_key_still_decrypts_through_its_fallbacks(alice, settings):
    endpoint, secret = WebhookEndpoint.objects.add(alice, "https://example.com/h", ALL_EVENTS, timezone.now())
    old = settings.SECRET_KEY
    settings.SECRET_KEY = "a-new-key-" + "x" * 50
    settings.SECRET_KEY_FALLBACKS = [old]
    endpoint.refresh_from_db()
    assert endpoint.secret() == secret
    settings.SECRET_KEY_FALLBACKS = []
    with pytest.raises(webhooks.WebhookRefused):
        endpoint.secret()


def test_an_event_arrives_signed_per_standard_webhooks(alice, receiver, issue_code):
    _endpoint, secret = WebhookEndpoint.objects.add(alice, f"{receiver.url}/hook", ALL_EVENTS, timezone.now())
    island = issue_code(ip="203.0.113.7").row.redeem(alice)
    send_due()
    [(headers, data, path)] = receiver.requests
    assert path == "/hook"
    # The reference library checks the signature and the timestamp, and returns the payload.
    event = Webhook(secret).verify(data, headers)
    assert event["type"] == "island.linked"
    assert event["data"]["island_id"] == str(island.pk)
    assert event["data"]["address"] == "203.0.113.7"
    assert event["timestamp"].endswith("Z")
    delivery = Delivery.objects.get(channel="webhook")
    assert headers["webhook-id"] == delivery.message_id and delivery.status == "sent"
    # A body tampered with fails the same check.
    with pytest.raises(Exception, match="signature"):
        Webhook(secret).verify(data.replace(b"island.linked", b"island.online"), headers)


def test_only_the_chosen_events_are_sent(alice, receiver, issue_code):
    WebhookEndpoint.objects.add(alice, receiver.url, ["island.offline"], timezone.now())
    issue_code().row.redeem(alice)
    assert not Delivery.objects.filter(channel="webhook").exists()


def test_a_receiver_failing_then_succeeding_gets_the_event_once_more_with_the_same_id(
    alice, receiver, issue_code
):
    _endpoint, secret = WebhookEndpoint.objects.add(alice, receiver.url, ALL_EVENTS, timezone.now())
    receiver.answers = [500, 503]
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        issue_code().row.redeem(alice)
        # The email (no confirmed address here? alice has one) and the webhook.
        send_due()
    delivery = Delivery.objects.get(channel="webhook")
    assert delivery.status == "pending" and delivery.attempts == 1
    assert delivery.last_error.startswith("WebhookRefused: HTTP 500")
    assert delivery.next_attempt_at == start + timedelta(minutes=1)
    with time_machine.travel(start + timedelta(minutes=1), tick=False):
        send_due()
    with time_machine.travel(start + timedelta(minutes=3), tick=False):
        send_due()
    delivery.refresh_from_db()
    assert delivery.status == "sent" and delivery.attempts == 3
    assert receiver.ids() == [delivery.message_id] * 3
    with time_machine.travel(start + timedelta(minutes=3), tick=False):
        Webhook(secret).verify(receiver.requests[-1][1], receiver.requests[-1][0])


def test_an_hour_of_failures_pauses_the_endpoint_and_emails_the_owner(alice, receiver, issue_code, mailbox):
    endpoint, _ = WebhookEndpoint.objects.add(alice, receiver.url, ALL_EVENTS, timezone.now())
    receiver.answers = [500] * 20
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        issue_code().row.redeem(alice)
    moment = start
    for _ in range(MAX_ATTEMPTS):
        with time_machine.travel(moment, tick=False):
            send_due()
        moment = Delivery.objects.get(channel="webhook").next_attempt_at
    delivery = Delivery.objects.get(channel="webhook")
    assert delivery.status == "failed" and delivery.attempts == MAX_ATTEMPTS
    # 1 + 2 + 4 + 8 + 16 + 32 minutes: about an hour of retries.
    assert len(receiver.requests) == MAX_ATTEMPTS
    endpoint.refresh_from_db()
    assert endpoint.paused and "HTTP 500" in endpoint.paused_reason
    with time_machine.travel(moment + timedelta(minutes=1), tick=False):
        send_due()
    paused = [m for m in mailbox.to("alice@example.org") if m["Subject"].startswith("Webhook paused")]
    assert len(paused) == 1 and receiver.url in body(paused[0])
    # Paused: new events write no delivery to it until it is resumed.
    Notification.objects.record(alice, "island.linked", "linked:x", {}, timezone.now())
    assert Delivery.objects.filter(channel="webhook").count() == 1


def test_a_slow_receiver_times_out_and_is_retried(alice, receiver, issue_code, monkeypatch):
    monkeypatch.setattr(webhooks, "TIMEOUT", 0.3)
    WebhookEndpoint.objects.add(alice, receiver.url, ALL_EVENTS, timezone.now())
    receiver.delay = 1.0
    issue_code().row.redeem(alice)
    send_due()
    delivery = Delivery.objects.get(channel="webhook")
    assert delivery.status == "pending" and "timed out" in delivery.last_error


def test_a_redirect_is_not_followed(alice, receiver, issue_code):
    WebhookEndpoint.objects.add(alice, receiver.url, ALL_EVENTS, timezone.now())
    receiver.answers = [302]
    issue_code().row.redeem(alice)
    send_due()
    assert [path for _, _, path in receiver.requests] == ["/"]
    assert "HTTP 302" in Delivery.objects.get(channel="webhook").last_error


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",
        "https://127.0.0.1/hook",
        "https://10.1.2.3/hook",
        "https://192.168.0.10/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://[fe80::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "ftp://example.com/",
        "https://user:pw@example.com/",
    ],
)
def test_non_https_and_private_addresses_are_refused_with_the_form(alice_client, alice, settings, url):
    settings.WEBHOOKS_ALLOW_PRIVATE = False
    response = add_endpoint(alice_client, url)
    assert response.status_code == 400
    assert 'class="errorlist' in response.content.decode()
    assert not WebhookEndpoint.objects.exists()


def test_a_name_resolving_to_a_private_address_is_refused_at_send_time(alice, receiver, settings, issue_code):
    # Added while allowed (or a name that changed its address since): checked again when sending.
    port = receiver.url.rsplit(":", 1)[1]
    WebhookEndpoint.objects.add(alice, f"https://localhost:{port}/hook", ALL_EVENTS, timezone.now())
    settings.WEBHOOKS_ALLOW_PRIVATE = False
    issue_code().row.redeem(alice)
    send_due()
    assert receiver.requests == []
    delivery = Delivery.objects.get(channel="webhook")
    assert "loopback, private or link-local" in delivery.last_error


def test_send_test_event_and_the_last_deliveries_on_the_page(alice_client, alice, receiver):
    response = add_endpoint(alice_client, receiver.url)
    secret = shown_secret(response)
    endpoint = WebhookEndpoint.objects.get()
    assert alice_client.post(f"/settings/notifications/webhooks/{endpoint.pk}/test").status_code == 302
    send_due()
    [(headers, data, _)] = receiver.requests
    assert Webhook(secret).verify(data, headers)["type"] == "test"
    page = alice_client.get("/settings/notifications").content.decode()
    assert "Last deliveries" in page and headers["webhook-id"] in page and ">Sent<" in page


def test_another_account_cannot_touch_an_endpoint(alice, bob_client):
    endpoint, _ = WebhookEndpoint.objects.add(alice, "https://example.com/h", ALL_EVENTS, timezone.now())
    for action in ("test", "pause", "delete"):
        assert bob_client.post(f"/settings/notifications/webhooks/{endpoint.pk}/{action}").status_code == 404
    assert WebhookEndpoint.objects.filter(pk=endpoint.pk, paused_at__isnull=True).exists()


def test_the_payload_is_json_with_type_timestamp_and_data():
    body_bytes = webhooks.payload("island.offline", timezone.now(), {"a": 1})
    assert set(json.loads(body_bytes)) == {"type", "timestamp", "data"}
