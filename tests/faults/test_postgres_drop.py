"""PostgreSQL connections drop under daphne, the watcher and the bridge, which carry on.

Two ways to drop them, each a test parameter:

- "restart": the process reaches PostgreSQL through a TCP proxy of the
  test's own, which closes every connection and refuses new ones for a
  moment, as PostgreSQL does while it restarts.
- "terminate": pg_terminate_backend() on the backends of the process under
  test, and only those (the test database's name and the process's own
  application_name), as an administrator or a failover would.

The request, step or job status that is using a connection at that moment
fails (the test makes sure one is, by holding a row lock the process waits
on): a request answers a JSON 503, a watcher step is retried, a status is
tried again. Nothing restarts the process: what comes next gets healthy
connections (the pool checks each before handing it out, CONN_HEALTH_CHECKS).
"""

import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.test import Client

from archipelag.nats import Subjects
from islands.models import Island, Job, StatusChange
from karma.models import KarmaEvent
from pairing.models import MobilePairingSession
from simulator.desktop import Client as ApiClient
from tests.bridge.test_nats import Agent
from tests.faults.conftest import (
    backends,
    bridge_counters,
    database_url,
    row_locked,
    silent_islands,
    terminate_backends,
    wait_for,
    waiting_on_a_lock,
)
from tests.islands.conftest import MINIMAL_HEARTBEAT, give_job, make_island
from tests.pairing.conftest import IPHONE, MOBILE_PAIR

DROPS = ["restart", "terminate"]
DATABASE_UNAVAILABLE = {
    "success": False,
    "error": "the coordinator cannot reach its database; retry in 5 seconds",
}
# How long PostgreSQL stays away in the "restart" case.
RESTART_SECONDS = 1.0


def noop() -> None:
    pass


def silences() -> int:
    return StatusChange.objects.filter(reason=StatusChange.Reason.SILENCE).count()


def drop_connections(how: str, proxy: Any, app_name: str, while_down: Callable[[], None] = noop) -> set[int]:
    """Drop every connection of the process under test; return their backends' pids.

    In the "restart" case `while_down` runs while PostgreSQL is away.
    """
    before = backends(app_name)
    assert before, "the process under test holds no connection to drop"
    if how == "restart":
        # Closed on the client's side: each backend ends once it notices (one
        # waiting on a lock only when the lock is released).
        proxy.down()
        while_down()
        time.sleep(RESTART_SECONDS)  # PostgreSQL "restarting": not an assertion
        proxy.up()
    else:
        assert terminate_backends(app_name) == before
    return before


def wait_until_gone(dropped: set[int], app_name: str) -> None:
    wait_for(lambda: not backends(app_name) & dropped, what="the dropped backends to end")


class Browser:
    """Alice's signed-in session, for GET /settings."""

    def __init__(self, server: Any, user: Any):
        client = Client()
        client.force_login(user)
        self.cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
        self.server = server

    def get(self, path: str) -> tuple[int, str]:
        request = urllib.request.Request(self.server.url + path, headers={"Cookie": self.cookie})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


@pytest.mark.parametrize("how", DROPS)
def test_daphne_answers_the_next_requests_after_its_connections_drop(spawn, pg_proxy, alice, how):
    island = make_island(alice)
    token = island.issue_token()
    server = spawn.daphne(DATABASE_URL=database_url("127.0.0.1", pg_proxy.port))
    island_api = ApiClient(server.url, token=token, timeout=30)
    browser = Browser(server, alice)

    def heartbeat() -> tuple[int, dict[str, Any]]:
        return island_api.post("/api/v1/islands/heartbeat", MINIMAL_HEARTBEAT)

    def requests_succeed() -> None:
        assert heartbeat() == (200, {"success": True})
        status, page = browser.get("/settings")
        assert status == 200 and island.name in page
        opened = MobilePairingSession.objects.open(alice)
        phone = str(uuid.uuid4())
        status, body = ApiClient(server.url, timeout=30).post(
            MOBILE_PAIR, {"host_id": phone, "device": IPHONE, "secret": opened.secret}
        )
        assert status == 201, body
        assert Island.objects.filter(host_id=phone, owner=alice).exists()

    requests_succeed()

    # A heartbeat is waiting for PostgreSQL (on a row lock the test holds) when
    # its connection drops: that one request fails, and says so in JSON. In
    # the "restart" case another arrives while PostgreSQL is away: it waits
    # for the pool to connect again (up to the pool's 10 s) and succeeds.
    in_flight: list[tuple[int, dict[str, Any]]] = []
    during: list[tuple[int, dict[str, Any]]] = []
    late = threading.Thread(target=lambda: during.append(heartbeat()))
    with row_locked(island):
        thread = threading.Thread(target=lambda: in_flight.append(heartbeat()))
        thread.start()
        wait_for(lambda: waiting_on_a_lock(server.app_name), what="the heartbeat to wait on the lock")
        dropped = drop_connections(how, pg_proxy, server.app_name, while_down=late.start)
    thread.join(60)
    assert in_flight == [(503, DATABASE_UNAVAILABLE)]
    if how == "restart":
        late.join(60)
        assert during == [(200, {"success": True})]
    wait_until_gone(dropped, server.app_name)

    # The next requests succeed on new connections, from the same daphne.
    requests_succeed()
    assert server.process.alive
    assert backends(server.app_name).isdisjoint(dropped)


@pytest.mark.parametrize("how", DROPS)
def test_the_watcher_keeps_recording_after_its_connection_drops(spawn, pg_proxy, alice, how):
    islands = silent_islands(alice, 40, silent_for=timedelta(seconds=1))
    app_name = f"faults-watcher-{uuid.uuid4().hex[:8]}"
    # The watcher handles the oldest deadline first: it records nine
    # silences, then waits on the tenth Island, which the test holds.
    with row_locked(islands[9]):
        watcher = spawn.command(
            "watcher",
            "watch_islands",
            "--interval",
            "0.2",
            app_name=app_name,
            DATABASE_URL=database_url("127.0.0.1", pg_proxy.port),
        )
        wait_for(lambda: waiting_on_a_lock(app_name), what="the watcher to wait on the lock")
        assert silences() == 9
        dropped = drop_connections(how, pg_proxy, app_name)
    # That step fails; the watcher logs it and goes on, on a new connection.
    watcher.wait_for_log("event=watch_failed")
    wait_for(lambda: silences() == len(islands), what="every silence to be recorded")
    # It keeps watching: an Island falling silent now is recorded too.
    (later,) = silent_islands(alice, 1, silent_for=timedelta(0))
    wait_for(lambda: silences() == len(islands) + 1, what="the later silence")

    assert watcher.alive
    per_island = Counter(
        StatusChange.objects.filter(reason=StatusChange.Reason.SILENCE).values_list("island_id", flat=True)
    )
    assert per_island == {island.pk: 1 for island in [*islands, later]}
    wait_until_gone(dropped, app_name)
    assert backends(app_name).isdisjoint(dropped)
    assert watcher.stop() == 0


@pytest.mark.parametrize("how", DROPS)
def test_the_bridge_applies_a_job_status_whose_connection_drops(spawn, pg_proxy, nats_server, alice, how):
    """Core NATS delivers a status once: the bridge tries it again on a new connection."""
    island = make_island(alice)
    job = give_job(
        island=island, job_id="dropped-1", workload="llm-chat", credits=Decimal(2), lease=timedelta(minutes=5)
    )
    prefix = f"faults{uuid.uuid4().hex[:12]}."
    app_name = f"faults-bridge-{uuid.uuid4().hex[:8]}"
    bridge = spawn.command(
        "bridge",
        "nats_bridge",
        "--url",
        nats_server.url,
        "--subject-prefix",
        prefix,
        app_name=app_name,
        DATABASE_URL=database_url("127.0.0.1", pg_proxy.port),
    )
    bridge.wait_for_log("event=bridge_ready")
    agent = Agent(nats_server.url, Subjects(prefix))
    try:
        with row_locked(job):
            agent.send("status", {"job_id": job.job_id, "state": "succeeded"})
            wait_for(lambda: waiting_on_a_lock(app_name), what="the status to wait on the lock")
            dropped = drop_connections(how, pg_proxy, app_name)
        wait_for(lambda: Job.objects.get(pk=job.pk).state == Job.State.SUCCEEDED, what="the status")
        assert bridge.stop() == 0
    finally:
        agent.close()

    counters = bridge_counters(bridge.output())
    assert counters["status_retries"] >= 1
    assert counters["status_applied"] == 1
    assert "status_failed" not in counters
    island.refresh_from_db()
    assert (island.jobs_completed, island.earnings) == (1, Decimal(2))
    assert KarmaEvent.objects.filter(job=job).count() == 1
    assert island.karma == Decimal("50.25")
    assert backends(app_name).isdisjoint(dropped)
