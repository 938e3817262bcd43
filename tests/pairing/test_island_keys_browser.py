"""Adding Islands with keys, in a real browser, with DEBUG on and off."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from islands.models import IslandKey
from tests.conftest import (
    BASE_DIR,
    LiveServer,
    _free_port,
    _reachable,
    _test_database_url,
    daphne_args,
    login_browser,
)


@pytest.fixture(params=["1", "0"], ids=["debug-on", "debug-off"])
def keys_server(
    request: pytest.FixtureRequest, transactional_db: None, tmp_path: Path
) -> Iterator[LiveServer]:
    """daphne on the test database; with DEBUG off as in production (collected static, no debug pages)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DATABASE_URL": _test_database_url(),
        "PUBLIC_URL": url,
        "DEBUG": request.param,
        "DJANGO_SETTINGS_MODULE": "archipelag.settings",
        "NATS_PUBLIC_URL": "tls://nats.example.org:4222",
    }
    if request.param == "0":
        env |= {
            # The test process's key: login_browser's session is signed with it.
            "SECRET_KEY": settings.SECRET_KEY,
            "ALLOWED_HOSTS": "127.0.0.1",
            "STATIC_ROOT": str(tmp_path / "static"),
            # Plain HTTP in the test; production sits behind TLS.
            "SECURE_SSL_REDIRECT": "0",
            "SESSION_COOKIE_SECURE": "0",
            "CSRF_COOKIE_SECURE": "0",
        }
        subprocess.run(
            [sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"],
            cwd=BASE_DIR,
            env=env,
            check=True,
        )
    log = tmp_path / "daphne.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            daphne_args(port), cwd=BASE_DIR, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    server = LiveServer(url, process, log)
    deadline = time.monotonic() + 20
    while not _reachable(url, port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"daphne did not start:\n{server.output()}")
        time.sleep(0.1)
    yield server
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.mark.browser
def test_add_islands_with_keys_then_revoke_one(browser_page, keys_server, alice):
    page = browser_page
    login_browser(page, keys_server, alice)
    page.goto(keys_server.url + "/pair")
    page.get_by_role("heading", name="Add an Island with a key").wait_for()
    page.get_by_label("How many Islands").fill("2")
    page.get_by_role("button", name="Make keys").click()
    page.get_by_role("heading", name="Your 2 Island keys").wait_for()
    assert page.get_by_text("only time the secret is shown").is_visible()

    blocks = page.locator("pre.config-lines").all_inner_texts()
    assert len(blocks) == 2
    keys = list(IslandKey.objects.order_by("pk"))
    for key, block in zip(
        keys, sorted(blocks, key=lambda b: [k.host_id in b for k in keys].index(True)), strict=True
    ):
        assert block.startswith(f'host_id = "{key.host_id}"\n')
        assert "[coordinator]" in block
        assert f'nats_url = "tls://{key.username}:' in block
        assert block.rstrip().endswith('@nats.example.org:4222"')
    assert {k.owner for k in keys} == {alice}

    page.get_by_role("link", name="Done").click()
    page.wait_for_url(keys_server.url + "/settings")
    rows = page.locator("#island-keys tbody tr")
    assert rows.count() == 2
    first = page.locator(f'tr[data-key="{keys[0].username}"]')
    assert first.get_by_text("Waiting for first use").is_visible()
    page.on("dialog", lambda dialog: dialog.accept())
    first.get_by_role("button", name="Revoke").click()
    page.get_by_text(f"Key {keys[0].username} is revoked").wait_for()
    assert page.locator(f'tr[data-key="{keys[0].username}"]').get_by_text("Revoked").is_visible()
    assert (
        page.locator(f'tr[data-key="{keys[0].username}"]').get_by_role("button", name="Revoke").count() == 0
    )
    keys[0].refresh_from_db()
    keys[1].refresh_from_db()
    assert keys[0].revoked_at is not None
    assert keys[1].revoked_at is None


@pytest.mark.browser
def test_a_bad_count_shows_the_error_on_the_page(browser_page, keys_server, alice):
    page = browser_page
    login_browser(page, keys_server, alice)
    page.goto(keys_server.url + "/pair")
    page.get_by_label("How many Islands").fill("500")
    page.get_by_role("button", name="Make keys").click()
    page.get_by_text("At most 100 keys at a time.").wait_for()
    assert IslandKey.objects.count() == 0
