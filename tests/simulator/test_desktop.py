"""The bundled Island simulator pairs through the real HTTP API, reports in, runs jobs and signs off."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.test import Client

from islands.models import Attempt, Island, Job, JobSpec, NoEligibleIsland, StatusChange
from pairing.models import PairingCode
from simulator.desktop import SIMULATOR_VERSION, IslandSimulator, State, TokenRevoked
from tests.islands.conftest import give_job, make_island

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

    IslandSimulator(daphne_server.url, state_path=state_path, out=out, sleep=sleep).run(serve=False)

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
    IslandSimulator(daphne_server.url, state_path=state_path, out=again, sleep=sleep).run(serve=False)
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
        # SIGTERM signs off first: an HTTP request to a server that may be
        # slow on a loaded machine (CI once took more than 10 s).
        process.wait(timeout=60)


# --- After pairing: heartbeats, demo jobs, sign-off ---------------------------------------


def paired_state(path, island, url):
    State(
        host_id=island.host_id,
        paired=True,
        island_id=str(island.pk),
        token=island.issue_token(),
        coordinator=url,
    ).save(path)


def give(island, job_id, workload="llm-chat"):
    give_job(
        island=island, job_id=job_id, workload=workload, credits=Decimal("1.5"), lease=timedelta(minutes=5)
    )


def test_simulator_beats_runs_demo_jobs_and_signs_off(daphne_server, alice, tmp_path):
    island = make_island(alice, gpu_model="", gpu_vram_mb=None, cpu_cores=None, ram_mb=None)
    state_path = tmp_path / "state.json"
    paired_state(state_path, island, daphne_server.url)
    out = io.StringIO()
    naps = []
    seen_running = []

    def sleep(seconds):
        naps.append(seconds)
        if len(naps) == 1:
            give(island, "demo-ok")
            give(island, "demo-bad", workload="please-fail")
        if len(naps) == 3:
            seen_running.append(Island.objects.get(pk=island.pk).metrics["active_jobs"])
        if len(naps) == 5:
            raise KeyboardInterrupt

    simulator = IslandSimulator(daphne_server.url, state_path=state_path, out=out, sleep=sleep, interval=7)
    with pytest.raises(KeyboardInterrupt):
        simulator.run()

    assert naps == [7] * 5
    assert seen_running == [2]
    island.refresh_from_db()
    assert island.cpu_cores == os.cpu_count()
    assert island.ram_mb and island.ram_mb > 0
    assert island.agent_version == SIMULATOR_VERSION
    # It offers placement what the agent assumes by default, and room for a few jobs.
    assert island.supported_runtimes == ["container", "wasm"]
    assert (island.runtimes, island.capacity) == (" container wasm ", 4)
    assert island.status == Island.Status.SIGNED_OFF
    assert list(island.status_changes.order_by("at").values_list("reason", flat=True)) == [
        StatusChange.Reason.FIRST_HEARTBEAT,
        StatusChange.Reason.GRACEFUL,
    ]
    ok, bad = Job.objects.get(job_id="demo-ok"), Job.objects.get(job_id="demo-bad")
    assert ok.state == Job.State.SUCCEEDED and ok.started_at is not None
    assert bad.state == Job.State.FAILED and "demo failure" in bad.error
    assert (island.jobs_completed, island.jobs_failed, island.earnings) == (1, 1, Decimal("1.5"))
    lines = out.getvalue().splitlines()
    took = r"Took job demo-ok: llm-chat on container, for 1\.5000 credits, lease (29\d|300) s"
    assert any(re.fullmatch(took, line) for line in lines), lines
    assert "Job demo-ok (llm-chat): started" in lines
    assert "Job demo-ok (llm-chat): streaming" in lines
    assert "Job demo-ok (llm-chat): succeeded" in lines
    assert "Job demo-bad (please-fail): failed" in lines
    assert lines[-1] == "Signed off: the coordinator shows this Island as offline."


def test_simulator_stops_and_forgets_its_token_when_removed(daphne_server, alice, tmp_path):
    island = make_island(alice)
    state_path = tmp_path / "state.json"
    paired_state(state_path, island, daphne_server.url)

    def sleep(seconds):
        Island.objects.get(pk=island.pk).remove()

    with pytest.raises(TokenRevoked, match="Was it removed at /settings"):
        IslandSimulator(daphne_server.url, state_path=state_path, out=io.StringIO(), sleep=sleep).run()
    state = json.loads(state_path.read_text())
    assert state["token"] is None and state["paired"] is False
    assert state["host_id"] == island.host_id


def wait_for(condition, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_the_island_command_signs_off_on_sigterm(daphne_server, alice, tmp_path):
    island = make_island(alice)
    state_path = tmp_path / "state.json"
    paired_state(state_path, island, daphne_server.url)
    log = tmp_path / "island.log"
    argv = [sys.executable, "manage.py", "island", "--url", daphne_server.url, "--state", str(state_path)]
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*argv, "--interval", "0.2"],
            cwd=BASE_DIR,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        wait_for(lambda: Island.objects.get(pk=island.pk).status == Island.Status.ONLINE, "a heartbeat")
        give(island, "demo-1")
        wait_for(lambda: Job.objects.get(job_id="demo-1").state == Job.State.SUCCEEDED, "the demo job")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert "Sending a heartbeat every 0.2 s." in output
    assert "Signed off: the coordinator shows this Island as offline." in output
    assert output.rstrip().endswith("Stopped.")
    island.refresh_from_db()
    assert island.status == Island.Status.SIGNED_OFF
    assert island.status_changes.filter(reason=StatusChange.Reason.GRACEFUL).count() == 1


def test_stopping_with_a_job_in_flight_finishes_it_before_signing_off(daphne_server, alice, tmp_path):
    """Left running, the job would hold its slot until its lease ran out: a rerun finds the Island full."""
    island = make_island(alice)
    state_path = tmp_path / "state.json"
    paired_state(state_path, island, daphne_server.url)
    log = tmp_path / "island.log"
    argv = [sys.executable, "manage.py", "island", "--url", daphne_server.url, "--state", str(state_path)]
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*argv, "--interval", "1"], cwd=BASE_DIR, stdout=sink, stderr=subprocess.STDOUT, text=True
        )
    try:
        wait_for(lambda: Island.objects.get(pk=island.pk).status == Island.Status.ONLINE, "a heartbeat")
        give(island, "in-flight-1")
        wait_for(lambda: Job.objects.get(job_id="in-flight-1").state == Job.State.STARTED, "the job to start")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert "Finishing 1 job(s) in flight before signing off." in output
    assert output.index("Job in-flight-1 (llm-chat): succeeded") < output.index("Signed off")
    assert Job.objects.get(job_id="in-flight-1").state == Job.State.SUCCEEDED
    island.refresh_from_db()
    assert island.jobs_running == 0
    assert island.status == Island.Status.SIGNED_OFF


# --- Jobs the coordinator placed: the poll's fields, capacity, runtimes, cancels ------------


def placed(job_id, runtime="container", **artefacts):
    """A job submitted as the dispatcher submits it, placed by the coordinator (no Island named)."""
    spec = JobSpec(
        job_id=job_id,
        workload="llm-chat",
        lease=timedelta(minutes=5),
        budget=Decimal(2),
        runtime=runtime,
        input={"prompt": "hello"},
        artefacts=artefacts,
    )
    return Job.objects.submit(spec)


def test_the_simulator_runs_what_placement_gives_it_and_offers_what_it_is_told(
    daphne_server, alice, tmp_path
):
    island = make_island(alice)
    paired_state(tmp_path / "state.json", island, daphne_server.url)
    out = io.StringIO()
    naps = []

    def sleep(seconds):
        naps.append(seconds)
        if len(naps) == 1:
            placed("wasm-1", runtime="wasm", wasm_url="https://example.com/w.wasm", wasm_hash="ab" * 32)
            # It said it runs wasm only: a container job has nowhere to go.
            with pytest.raises(NoEligibleIsland) as refused:
                placed("container-1")
            assert refused.value.reasons["runtime"] == 1
        if len(naps) == 4:
            raise KeyboardInterrupt

    simulator = IslandSimulator(
        daphne_server.url,
        state_path=tmp_path / "state.json",
        out=out,
        sleep=sleep,
        capacity=2,
        runtimes=["wasm"],
    )
    with pytest.raises(KeyboardInterrupt):
        simulator.serve()

    island.refresh_from_db()
    assert (island.supported_runtimes, island.runtimes, island.capacity) == (["wasm"], " wasm ", 2)
    lines = out.getvalue().splitlines()
    assert any(
        re.fullmatch(r"Took job wasm-1: llm-chat on wasm, for 1\.0000 credits, lease (29\d|300) s", line)
        for line in lines
    ), lines
    assert "Job wasm-1 (llm-chat): succeeded" in lines
    job = Job.objects.get(job_id="wasm-1")
    assert (job.state, job.island) == (Job.State.SUCCEEDED, island)
    assert not Job.objects.filter(job_id="container-1").exists()


def test_a_cancelled_job_is_stopped_and_never_reported_again(daphne_server, alice, tmp_path):
    island = make_island(alice)
    paired_state(tmp_path / "state.json", island, daphne_server.url)
    out = io.StringIO()
    naps = []

    def sleep(seconds):
        naps.append(seconds)
        if len(naps) == 1:
            placed("to-cancel")
            placed("to-finish")
        if len(naps) == 2:
            assert Job.objects.get(job_id="to-cancel").state == Job.State.STARTED
            Job.objects.cancel("to-cancel")
        if len(naps) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        IslandSimulator(daphne_server.url, state_path=tmp_path / "state.json", out=out, sleep=sleep).serve()

    lines = out.getvalue().splitlines()
    stopped = lines.index("Job to-cancel (llm-chat): cancelled by the dispatcher; stopped")
    assert not [line for line in lines[stopped + 1 :] if "to-cancel" in line]
    assert not [line for line in lines if "refused" in line]
    assert "Job to-finish (llm-chat): succeeded" in lines
    assert dict(Job.objects.values_list("job_id", "state")) == {
        "to-cancel": "cancelled",
        "to-finish": "succeeded",
    }
    assert list(Attempt.objects.filter(job__job_id="to-cancel").values_list("outcome", flat=True)) == [
        "withdrawn"
    ]
    island.refresh_from_db()
    assert (island.jobs_completed, island.jobs_running) == (1, 0)


def test_a_report_the_coordinator_cannot_take_now_is_sent_again(daphne_server, alice, tmp_path, monkeypatch):
    """A 503 (its database busy, say) keeps the job: the report goes again at the next heartbeat."""
    island = make_island(alice)
    paired_state(tmp_path / "state.json", island, daphne_server.url)
    out = io.StringIO()
    naps = []

    def sleep(seconds):
        naps.append(seconds)
        if len(naps) == 1:
            placed("busy-1")
        if len(naps) == 6:
            raise KeyboardInterrupt

    simulator = IslandSimulator(daphne_server.url, state_path=tmp_path / "state.json", out=out, sleep=sleep)
    real_call = simulator._call
    busy = {"started": 1, "succeeded": 2}

    def call(path, payload):
        state = payload.get("state")
        if busy.get(state):
            busy[state] -= 1
            return 503, {"success": False, "error": "the coordinator cannot reach its database"}
        return real_call(path, payload)

    monkeypatch.setattr(simulator, "_call", call)
    with pytest.raises(KeyboardInterrupt):
        simulator.serve()

    lines = out.getvalue().splitlines()
    assert (
        lines.count(
            "Job busy-1: could not report 'succeeded' now "
            "(the coordinator cannot reach its database, HTTP 503); trying again at the next heartbeat"
        )
        == 2
    )
    assert "Job busy-1 (llm-chat): streaming" in lines
    assert lines[-2] == "Job busy-1 (llm-chat): succeeded"
    job = Job.objects.get(job_id="busy-1")
    assert job.state == Job.State.SUCCEEDED and job.started_at is not None
    island.refresh_from_db()
    assert (island.jobs_completed, island.jobs_running) == (1, 0)
