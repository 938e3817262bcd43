"""Shared fixtures: personas, builders, and the real services some tests need.

A test that needs PostgreSQL, Redis, NATS or chromium skips, saying why, when
that service is not configured. `.ci/run` sets ARCHIPELAG_REQUIRE_SERVICES=1,
which turns every such skip into a failure, so CI runs every test.
"""

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import msgspec
import pytest
import pytest_asyncio
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import connection
from django.test import Client
from django.test import client as django_test_client

from archipelag.handlers import is_api_path, load_api_middleware
from islands.agent import Capabilities, HostRegistration
from pairing.models import IssuedCode, PairingCode

BASE_DIR = Path(__file__).resolve().parent.parent
REQUIRE_SERVICES = os.environ.get("ARCHIPELAG_REQUIRE_SERVICES") == "1"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
PASSWORD = "correct-horse-battery-staple"


class _ApiClientHandler(django_test_client.ClientHandler):
    """The test client's handler with the API's middleware, as ApiASGIHandler has it."""

    def load_middleware(self, is_async: bool = False) -> None:
        load_api_middleware(self, is_async)


class _RoutingClientHandler(django_test_client.ClientHandler):
    """Route the test client's requests as asgi.py routes daphne's: /api/ to the lean chain."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.api = _ApiClientHandler(*args, **kwargs)

    def __call__(self, environ: dict[str, Any]) -> Any:
        if is_api_path(environ["PATH_INFO"]):
            return self.api(environ)
        return super().__call__(environ)


def pytest_configure(config: pytest.Config) -> None:
    # Password hashing is deliberately slow; tests create many users.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # Every django.test.Client (pytest-django's `client`, and those tests make
    # themselves) builds its handler from this name: so a test's request
    # under /api/ runs the API's middleware, as under daphne, not the
    # browser stack's. tests/test_api_stack.py holds both to it.
    django_test_client.ClientHandler = _RoutingClientHandler  # type: ignore[misc]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if REQUIRE_SERVICES and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"skipped in a run that requires every service (ARCHIPELAG_REQUIRE_SERVICES=1): {reason}"
        )


@pytest.fixture(autouse=True)
def _clear_cache() -> Iterator[None]:
    # Rate-limit counters live in the cache; each test starts with none.
    cache.clear()
    yield
    cache.clear()


# --- Services ----------------------------------------------------------------


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def postgres() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: set DATABASE_URL=postgres://... (.ci/run does)")


@pytest.fixture
def redis_url() -> str:
    if not settings.REDIS_URL:
        pytest.skip("needs Redis: set REDIS_URL=redis://... (.ci/run does)")
    if not _reachable(settings.REDIS_URL, 6379):
        pytest.skip(f"needs Redis, but nothing answers at {settings.REDIS_URL}")
    return str(settings.REDIS_URL)


@pytest.fixture
def nats_url() -> str:
    url = os.environ.get("NATS_URL")
    if not url:
        pytest.skip("needs NATS: set NATS_URL=nats://... (.ci/run does)")
    if not _reachable(url, 4222):
        pytest.skip(f"needs NATS, but nothing answers at {url}")
    return url


@pytest_asyncio.fixture
async def fresh_channel_layer() -> AsyncIterator[None]:
    """Flush the channel layer after the test, so no group or message outlives it."""
    yield
    layer = get_channel_layer()
    if hasattr(layer, "flush"):
        await layer.flush()


# axe-core, installed by .ci/run (npm ci --prefix .ci/axe), injected into pages by the browser tests.
AXE_JS = BASE_DIR / ".ci" / "axe" / "node_modules" / "axe-core" / "axe.min.js"
# What fails a test: the two worst of axe's four impacts.
AXE_FAILING_IMPACTS = ("serious", "critical")


@pytest.fixture
def axe(browser_page: Any) -> Callable[[Any], list[str]]:
    """A function that runs axe-core on a page and returns its serious and critical violations, as text.

    axe-core goes in as an init script on every page the test opens: the
    site's Content-Security-Policy (script-src 'self') refuses an inline
    script tag, and init scripts are the browser's own, outside the policy.
    """
    if not AXE_JS.exists():
        pytest.skip("needs axe-core: npm ci --prefix .ci/axe (.ci/run does)")
    browser_page.add_init_script(path=str(AXE_JS))

    def run(page: Any) -> list[str]:
        results = page.evaluate("async () => (await window.axe.run(document)).violations")
        return [
            f"{violation['impact']} {violation['id']}: {violation['help']} at "
            + "; ".join(", ".join(node["target"]) for node in violation["nodes"][:3])
            for violation in results
            if violation["impact"] in AXE_FAILING_IMPACTS
        ]

    return run


@pytest.fixture
def browser_page(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fresh chromium page. Function-scoped on purpose: see below."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"needs chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("needs the playwright package (make test installs it)")
    # Playwright's sync API keeps an event loop in this thread, which makes
    # Django refuse ORM calls from the test. They are safe: no coroutine of
    # ours runs in that loop. The permission ends with the test, so other
    # tests still catch sync ORM calls made from async code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--headless",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_context().new_page()
        page.set_default_timeout(10_000)
        yield page
        browser.close()


def race(callables: list[Callable[[], object]]) -> None:
    """Run the callables in threads released at once (on PostgreSQL); fail on any error."""
    barrier = threading.Barrier(len(callables))
    errors: list[BaseException] = []

    def run(target: Callable[[], object]) -> None:
        try:
            barrier.wait()
            target()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(target,)) for target in callables]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def admin_column(listing: str, name: str) -> list[str]:
    """The text of each row's cell in one column of an admin changelist page, in order."""
    cells = re.findall(rf'<td class="field-{name}(?: [^"]*)?"[^>]*>(.*?)</td>', listing, flags=re.S)
    return [re.sub(r"<[^>]+>", "", cell).strip() for cell in cells]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def daphne_args(port: int) -> list[str]:
    """The command line of a daphne serving the app on 127.0.0.1:`port`, as the Dockerfile runs it."""
    return [
        *[sys.executable, "-m", "archipelag.server"],
        *["-b", "127.0.0.1", "-p", str(port), "archipelag.asgi:application"],
    ]


def _test_database_url() -> str:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{Path(db['NAME']).resolve()}"
    user = quote(db.get("USER") or "postgres")
    password = f":{quote(db['PASSWORD'])}" if db.get("PASSWORD") else ""
    return (
        f"postgres://{user}{password}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"
    )


class LiveServer:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path, *, debug: bool = True):
        self.url = url
        self.debug = debug
        self.process = process
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


# The environment of a daphne serving as production does, apart from TLS:
# cookies and redirects stay on plain http on 127.0.0.1. SECRET_KEY is the
# test process's own, so sessions made by login_browser() verify in daphne.
def _production_env(static_root: Path) -> dict[str, str]:
    return {
        "DEBUG": "0",
        "SECRET_KEY": str(settings.SECRET_KEY),
        "ALLOWED_HOSTS": "127.0.0.1",
        "STATIC_ROOT": str(static_root),
        "SECURE_SSL_REDIRECT": "0",
        "SECURE_HSTS_SECONDS": "0",
        "SESSION_COOKIE_SECURE": "0",
        "CSRF_COOKIE_SECURE": "0",
    }


@pytest.fixture(scope="session")
def collected_static(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """STATIC_ROOT as the Docker image builds it: what DEBUG=0 serves from."""
    root = tmp_path_factory.mktemp("staticfiles")
    env = {
        **os.environ,
        **_production_env(root),
        "DATABASE_URL": "sqlite:///" + str(root / "unused.sqlite3"),
        "DJANGO_SETTINGS_MODULE": "archipelag.settings",
    }
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"],
        cwd=BASE_DIR,
        env=env,
        check=True,
    )
    return root


def start_daphne(tmp_path: Path, *, debug: bool, static_root: Path | None = None) -> Iterator[LiveServer]:
    """daphne on a spare port on the test database, DEBUG on or off; stops after the yield."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DATABASE_URL": _test_database_url(),
        "PUBLIC_URL": url,
        "DEBUG": "1",
        "DJANGO_SETTINGS_MODULE": "archipelag.settings",
    }
    if not debug:
        assert static_root is not None, "DEBUG=0 serves collected static files: pass static_root"
        env.update(_production_env(static_root))
    log = tmp_path / f"daphne-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            daphne_args(port),
            cwd=BASE_DIR,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(url, process, log, debug=debug)
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


@pytest.fixture
def daphne_server(transactional_db: None, tmp_path: Path) -> Iterator[LiveServer]:
    """The real ASGI app under daphne, in its own process, on the test database.

    Unlike Django's live_server (a WSGI thread) it serves websockets. With
    REDIS_URL set it uses the channels-redis layer on that Redis. DEBUG is
    on, as `make run` serves; see live_server_debug for both modes.
    """
    yield from start_daphne(tmp_path, debug=True)


@pytest.fixture(params=[True, False], ids=["debug-on", "debug-off"])
def live_server_debug(
    request: pytest.FixtureRequest, transactional_db: None, tmp_path: Path
) -> Iterator[LiveServer]:
    """daphne as daphne_server, once with DEBUG on (`make run`) and once off (production).

    A test using it runs twice. Pages must behave the same in both: with
    DEBUG on django-htmx adds a script that replaces the page on some error
    answers, and pytest-django's own client always runs with DEBUG off.
    Parametrise indirectly to pick one: @pytest.mark.parametrize(
    "live_server_debug", [False], indirect=True).
    """
    debug = bool(request.param)
    static_root = None if debug else request.getfixturevalue("collected_static")
    yield from start_daphne(tmp_path, debug=debug, static_root=static_root)


def login_browser(page: Any, server: LiveServer, user: User) -> None:
    """Give the browser a signed-in session for `user`, as if it had logged in."""
    client = Client()
    client.force_login(user)
    page.context.add_cookies(
        [
            {
                "name": settings.SESSION_COOKIE_NAME,
                "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
                "url": server.url,
            }
        ]
    )


# --- Personas and builders -----------------------------------------------------


@pytest.fixture
def alice(db: None) -> User:
    """Alice owns Islands."""
    return User.objects.create_user("alice", "alice@example.org", PASSWORD)


@pytest.fixture
def bob(db: None) -> User:
    """Bob is another user, who must never see or touch Alice's things."""
    return User.objects.create_user("bob", "bob@example.org", PASSWORD)


@pytest.fixture
def alice_client(alice: User) -> Client:
    client = Client()
    client.force_login(alice)
    return client


@pytest.fixture
def bob_client(bob: User) -> Client:
    client = Client()
    client.force_login(bob)
    return client


HOST_ID = "550e8400-e29b-41d4-a716-446655440000"
CAPABILITIES = {
    "gpu_model": "RTX 4090",
    "gpu_vram_mb": 24576,
    "cpu_cores": 16,
    "ram_mb": 65536,
    "region": "us-east",
}


@pytest.fixture
def issue_code(db: None) -> Callable[..., IssuedCode]:
    """Build a pairing code as an Island would have asked for it over HTTP."""

    def build(
        host_id: str = HOST_ID,
        *,
        capabilities: dict[str, Any] = CAPABILITIES,
        version: str | None = "0.5.0",
        ip: str = "203.0.113.7",
        channel: PairingCode.Channel = PairingCode.Channel.HTTP,
        **kwargs: Any,
    ) -> IssuedCode:
        registration = HostRegistration(host_id, msgspec.convert(capabilities, Capabilities), version)
        return PairingCode.objects.request(registration, channel=channel, ip=ip, **kwargs)

    return build
