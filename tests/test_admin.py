from islands.models import Island
from pairing.models import PairingCode
from tests.conftest import admin_column as column


def test_pairing_codes_show_no_secret_in_full(admin_client, issue_code):
    issued = issue_code()
    row = PairingCode.objects.get()
    listing = admin_client.get("/admin/pairing/pairingcode/").content.decode()
    assert row.host_id in listing
    assert column(listing, "state") == ["live"]
    page = admin_client.get(f"/admin/pairing/pairingcode/{row.pk}/change/").content.decode()
    assert f"{row.code_hash[:8]}…" in page
    assert row.code_hash not in page
    assert row.device_secret_hash not in page
    assert issued.code not in page
    assert issued.device_secret not in page
    # Codes are made by Islands, not typed in by admins.
    assert admin_client.get("/admin/pairing/pairingcode/add/").status_code == 403


def test_islands_admin_lists_and_searches_and_hides_the_token(admin_client, alice):
    island = Island.objects.create(owner=alice, host_id="alice-host-0001", gpu_model="RTX 4090")
    token = island.issue_token()
    listing = admin_client.get("/admin/islands/island/?q=alice-host").content.decode()
    assert island.name in listing
    page = admin_client.get(f"/admin/islands/island/{island.pk}/change/").content.decode()
    assert "Issued (stored hashed)" in page
    assert island.token_hash not in page
    assert token not in page


def test_users_are_in_the_admin(admin_client, alice):
    assert "alice" in admin_client.get("/admin/auth/user/").content.decode()
