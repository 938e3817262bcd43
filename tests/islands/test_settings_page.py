from islands.models import Island


def test_settings_requires_login(client, db):
    response = client.get("/settings")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/settings"


def test_a_new_user_is_told_how_to_pair(alice_client):
    html = alice_client.get("/settings").content.decode()
    assert "No Islands yet" in html
    assert 'href="/pair"' in html


def test_your_islands_lists_only_your_active_islands(alice, bob, alice_client):
    mine = Island.objects.create(
        owner=alice,
        host_id="alice-host-0001",
        gpu_model="RTX 4090",
        gpu_vram_mb=24576,
        cpu_cores=16,
        ram_mb=65536,
    )
    Island.objects.create(owner=bob, host_id="bob-host-00001", name="Bob's box")
    gone = Island.objects.create(owner=alice, host_id="alice-host-0002", name="Old box")
    gone.remove()
    html = alice_client.get("/settings").content.decode()
    assert "Your Islands" in html
    assert mine.name == "RTX 4090 (alice-ho)"
    assert mine.name in html
    assert "alice-host-0001" in html
    assert "RTX 4090 24 GB · 16 CPU cores · 64 GB RAM" in html
    assert "Bob&#x27;s box" not in html and "bob-host" not in html
    assert "Old box" not in html


def test_refresh_with_htmx_renders_only_the_list(alice, alice_client):
    Island.objects.create(owner=alice, host_id="alice-host-0001")
    response = alice_client.get("/settings", headers={"HX-Request": "true"})
    html = response.content.decode()
    assert "<html" not in html
    assert html.strip().startswith('<div id="island-list">')
    assert "alice-host-0001" in html


def test_removing_an_island_revokes_its_token_at_once(alice, alice_client):
    island = Island.objects.create(owner=alice, host_id="alice-host-0001")
    token = island.issue_token()
    response = alice_client.post(f"/settings/islands/{island.pk}/remove", follow=True)
    assert "was removed" in response.content.decode()
    island.refresh_from_db()
    assert island.removed_at is not None
    assert Island.objects.authenticate(token) is None
    assert "alice-host-0001" not in alice_client.get("/settings").content.decode()


def test_nobody_can_remove_another_users_island(alice, bob_client):
    island = Island.objects.create(owner=alice, host_id="alice-host-0001")
    assert bob_client.post(f"/settings/islands/{island.pk}/remove").status_code == 404
    assert bob_client.get(f"/settings/islands/{island.pk}/remove").status_code == 405
    island.refresh_from_db()
    assert island.removed_at is None
