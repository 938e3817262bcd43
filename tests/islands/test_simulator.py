"""The bundled Island simulator pairs through the real HTTP API and remembers who it is."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client

from islands.models import Island
from islands.simulator import IslandSimulator
from pairing.models import PairingCode

BASE_DIR = Path(__file__).resolve().parent.parent.parent
CODE_LINE = re.compile(r"^Pairing code: ([0-9A-Z]{6})$", re.MULTILINE)


def test_simulator_pairs_and_a_restart_keeps_its_identity(daphne_server, alice, tmp_path):
    state_path = tmp_path / "island" / "state.json"
    out = io.StringIO()
    browser = Client()
    browser.force_login(alice)

    def sleep(seconds):
        # The person at /pair types the code while the simulator waits to poll.
        match = CODE_LINE.search(out.getvalue())
        if match and not Island.objects.exists():
            assert browser.post("/pair/confirm", {"code": match.group(1)}).status_code == 302

    IslandSimulator(daphne_server.url, state_path=state_path, out=out, sleep=sleep).run()

    lines = out.getvalue().splitlines()
    assert any(CODE_LINE.match(line) for line in lines)
    assert f"Enter this code at {daphne_server.url}/pair" in lines
    assert "Code expires in 10 minutes" in lines
    island = Island.objects.get()
    assert island.owner == alice
    assert f"Paired! This machine is now Island {island.pk}." in lines
    state = json.loads(state_path.read_text())
    assert state["host_id"] == island.host_id
    assert state["paired"] is True
    assert Island.objects.authenticate(state["token"]) == island
    assert state_path.stat().st_mode & 0o777 == 0o600

    # A restart neither asks for a code again nor loses its identity.
    again = io.StringIO()
    IslandSimulator(daphne_server.url, state_path=state_path, out=again, sleep=sleep).run()
    assert f"Already paired as Island {island.pk} (host {island.host_id})." in again.getvalue()
    assert PairingCode.objects.count() == 1


def test_simulator_asks_again_when_its_code_expires(daphne_server, db, tmp_path):
    out = io.StringIO()
    polls = []

    def sleep(seconds):
        polls.append(seconds)
        codes = CODE_LINE.findall(out.getvalue())
        if len(codes) == 1:
            # Let the first code run out, as if nobody typed it in time.
            PairingCode.objects.update(expires_at=PairingCode.objects.get().created_at)
        elif len(codes) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        IslandSimulator(daphne_server.url, state_path=tmp_path / "s.json", out=out, sleep=sleep).run()
    assert "The code expired before anyone entered it; asking for a new one." in out.getvalue()
    assert len(CODE_LINE.findall(out.getvalue())) == 2
    assert polls[0] == 5


def test_the_island_command_prints_the_code_and_pairs(daphne_server, alice, tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "island",
            "--url",
            daphne_server.url,
            "--state",
            str(tmp_path / "state.json"),
        ],
        cwd=BASE_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:
            seen.append(line.rstrip("\n"))
            match = CODE_LINE.match(seen[-1])
            if match:
                browser = Client()
                browser.force_login(alice)
                assert browser.post("/pair/confirm", {"code": match.group(1)}).status_code == 302
            if line.startswith("Paired!"):
                break
        assert f"Enter this code at {daphne_server.url}/pair" in seen
        assert Island.objects.get().owner == alice
    finally:
        process.terminate()
        process.wait(timeout=10)
