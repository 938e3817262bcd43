"""Island keys: minted at /pair or by create_island_key, listed and revoked at /settings."""

import csv
import html
import io
import re
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone

from archipelag.secrets import hash_secret
from islands.agent import Capabilities, HostRegistration
from islands.models import ISLAND_KEY_UNUSED_TTL, Island, IslandKey
from pairing.models import PairingCode

NATS_LINE = re.compile(r'nats_url = "(?P<url>[^"]+)"')
HOST_LINE = re.compile(r'host_id = "(?P<host_id>[0-9a-f-]{36})"')


def credentials(nats_url: str) -> tuple[str, str]:
    # Taken apart as the agent does: no percent-decoding.
    userinfo = nats_url.split("://", 1)[1].rsplit("@", 1)[0]
    user, _, secret = userinfo.partition(":")
    return user, secret


@override_settings(NATS_PUBLIC_URL="tls://nats.example.org:4222")
def test_one_key_is_shown_once_as_config_lines_and_only_its_hash_is_stored(alice_client, alice):
    response = alice_client.post("/pair/keys", {"count": "1"})
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    page = html.unescape(response.content.decode())
    key = IslandKey.objects.get()
    assert key.owner == alice
    host_line, nats_line = HOST_LINE.search(page), NATS_LINE.search(page)
    assert host_line and nats_line
    assert host_line["host_id"] == key.host_id
    url = nats_line["url"]
    assert url.startswith(f"tls://{key.username}:")
    assert url.endswith("@nats.example.org:4222")
    user, secret = credentials(url)
    assert user == key.username
    assert not set(":@/%") & set(user + secret)
    assert key.secret_hash == hash_secret(secret)
    assert secret not in key.secret_hash
    assert IslandKey.objects.authenticate(user, secret) == key
    assert IslandKey.objects.authenticate(user, secret + "x") is None
    # The secret is nowhere to be seen again.
    assert secret not in alice_client.get("/settings").content.decode()
    assert secret not in alice_client.get("/pair").content.decode()


def test_a_batch_gives_each_machine_its_own_key_and_host_id(alice_client):
    page = html.unescape(alice_client.post("/pair/keys", {"count": "5"}).content.decode())
    urls = [m["url"] for m in NATS_LINE.finditer(page)]
    hosts = [m["host_id"] for m in HOST_LINE.finditer(page)]
    assert len(set(urls)) == len(set(hosts)) == 5
    assert sorted(hosts) == sorted(IslandKey.objects.values_list("host_id", flat=True))
    assert len({credentials(url)[0] for url in urls}) == 5


def test_a_batch_as_csv_has_one_row_per_key(alice_client):
    response = alice_client.post("/pair/keys", {"count": "3", "format": "csv"})
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert len(rows) == 3
    for row in rows:
        key = IslandKey.objects.get(host_id=row["host_id"])
        user, secret = credentials(row["nats_url"])
        assert IslandKey.objects.authenticate(user, secret) == key
    assert urlsplit(rows[0]["nats_url"]).scheme == "nats"


@pytest.mark.parametrize(
    ("count", "message"),
    [("0", "Make at least one key."), ("101", "At most 100"), ("x", "whole number"), ("", "how many")],
)
def test_a_bad_count_shows_a_form_error_and_makes_nothing(alice_client, count, message):
    response = alice_client.post("/pair/keys", {"count": count})
    assert response.status_code == 400
    assert message in response.content.decode()
    assert IslandKey.objects.count() == 0


def test_making_keys_needs_a_signed_in_user_and_a_post(client, alice_client):
    assert client.post("/pair/keys", {"count": "1"}).status_code == 302
    assert alice_client.get("/pair/keys").status_code == 405
    assert IslandKey.objects.count() == 0


def test_an_unused_key_expires_after_a_day_but_a_used_one_lasts(alice, time_machine):
    start = timezone.now()
    time_machine.move_to(start, tick=False)
    unused, used = IslandKey.objects.issue(alice, 2)
    IslandKey.objects.filter(pk=used.key.pk).update(first_used_at=start + timedelta(hours=1))
    time_machine.move_to(start + ISLAND_KEY_UNUSED_TTL - timedelta(seconds=1), tick=False)
    assert IslandKey.objects.authenticate(unused.key.username, unused.secret) is not None
    time_machine.move_to(start + ISLAND_KEY_UNUSED_TTL, tick=False)
    assert IslandKey.objects.authenticate(unused.key.username, unused.secret) is None
    time_machine.move_to(start + timedelta(days=400), tick=False)
    assert IslandKey.objects.authenticate(used.key.username, used.secret) is not None


def test_settings_lists_the_owners_keys_and_revoke_refuses_them(alice_client, bob_client, alice):
    (issued,) = IslandKey.objects.issue(alice)
    page = alice_client.get("/settings").content.decode()
    assert issued.key.username in page and issued.key.host_id in page
    assert "Waiting for first use" in page
    assert issued.key.username not in bob_client.get("/settings").content.decode()

    # Bob cannot revoke Alice's key.
    assert bob_client.post(f"/settings/keys/{issued.key.pk}/revoke").status_code == 404
    assert alice_client.get(f"/settings/keys/{issued.key.pk}/revoke").status_code == 405
    assert IslandKey.objects.get().revoked_at is None

    response = alice_client.post(f"/settings/keys/{issued.key.pk}/revoke", follow=True)
    assert "is revoked" in response.content.decode()
    row = IslandKey.objects.get()
    assert row.revoked_at is not None
    assert IslandKey.objects.authenticate(issued.key.username, issued.secret) is None
    # A second click changes nothing.
    alice_client.post(f"/settings/keys/{issued.key.pk}/revoke")
    assert IslandKey.objects.get().revoked_at == row.revoked_at


def test_revoke_needs_the_csrf_token(alice):
    from django.test import Client

    (issued,) = IslandKey.objects.issue(alice)
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.post(f"/settings/keys/{issued.key.pk}/revoke").status_code == 403
    assert IslandKey.objects.get().revoked_at is None


@override_settings(NATS_PUBLIC_URL="nats://127.0.0.1:4222")
def test_the_command_prints_host_id_and_nats_url_per_key(alice, capsys):
    call_command("create_island_key", "alice", "--count", "3")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line in lines:
        host_id, url = line.split("\t")
        key = IslandKey.objects.get(host_id=host_id)
        assert key.owner == alice
        assert IslandKey.objects.authenticate(*credentials(url)) == key
        assert url.endswith("@127.0.0.1:4222")


def test_the_command_refuses_an_unknown_user_or_a_bad_count(alice):
    with pytest.raises(CommandError, match="No user"):
        call_command("create_island_key", "mallory")
    with pytest.raises(CommandError, match="between 1 and"):
        call_command("create_island_key", "alice", "--count", "0")
    assert IslandKey.objects.count() == 0


def test_a_registration_fills_in_hardware_the_pairing_request_lacked_but_never_rewrites_it(alice):
    """The agent publishes RegisterHost, then asks for a code; the bridge may handle the ask first."""
    (issued,) = IslandKey.objects.issue(alice, 1)
    host = issued.key.host_id
    assert PairingCode.objects.register(HostRegistration(host_id=host)) is True  # as the ask links it
    island = Island.objects.get(host_id=host)
    assert (island.gpu_model, island.cpu_cores, island.agent_version) == ("", None, "")

    hardware = Capabilities(gpu_model="RTX 4090", gpu_vram_mb=24576, cpu_cores=16)
    PairingCode.objects.register(HostRegistration(host_id=host, capabilities=hardware, version="0.5.0"))
    forged = Capabilities(gpu_model="Forged GPU", gpu_vram_mb=1, cpu_cores=1, ram_mb=2048)
    PairingCode.objects.register(HostRegistration(host_id=host, capabilities=forged, version="9.9.9"))

    island.refresh_from_db()
    assert (island.gpu_model, island.gpu_vram_mb, island.cpu_cores) == ("RTX 4090", 24576, 16)
    assert island.agent_version == "0.5.0"
    assert island.ram_mb == 2048  # still empty when the second came, so filled, not rewritten
