"""A stand-in for the Island software that speaks the coordinator's HTTP API.

It uses only the standard library, so it runs against any coordinator, and
keeps its identity in a state file the way the real agent keeps
~/.island/state.json: a restart neither asks for a new code nor forgets
which Island it is.

Once paired it sends a heartbeat every `interval` seconds with this host's
real CPU, memory and disk (and GPU, through nvidia-smi), and with the
runtimes and number of jobs at once it offers (placement reads both). It
polls for the jobs the coordinator placed on it (each the agent's AssignJob
and its pay), runs them as demo jobs, stops those the dispatcher cancelled
without reporting on them again, and on Ctrl-C or SIGTERM signs off with a
`"status": "offline"` heartbeat before it exits.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

DEFAULT_STATE_PATH = Path.home() / ".island" / "state.json"
SIMULATOR_VERSION = "sim-0.2.0"
DEFAULT_INTERVAL = 10.0
# A demo job is started when polled, streams at the next heartbeat and ends
# at the one after; a workload whose name contains "fail" fails instead.
DEMO_JOB_BEATS = 2
# What it offers placement in its heartbeats (performance_estimates): the
# runtimes the real agent assumes when it says nothing, and a few jobs at once.
DEFAULT_RUNTIMES = ("container", "wasm")
DEFAULT_CAPACITY = 4
# Simulators sharing a terminal (a fleet, in threads) print whole lines.
_SAY = threading.Lock()


class TokenRevoked(SystemExit):
    """The coordinator refused the token: the Island was removed (or the token expired)."""


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Make SIGTERM stop the simulator the way Ctrl-C does, so both sign off first."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class CoordinatorError(Exception):
    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(body.get("error") or f"HTTP {status}")
        self.status = status
        self.body = body


@dataclass
class State:
    host_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    paired: bool = False
    island_id: str | None = None
    token: str | None = None
    coordinator: str | None = None

    @classmethod
    def load(cls, path: Path) -> "State":
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        # The token is a credential: only the owner may read the file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self), handle, indent=2)
        tmp.replace(path)


def detect_hardware() -> dict[str, Any]:
    """CPU cores and RAM of this machine; the GPU through nvidia-smi when it works."""
    capabilities: dict[str, Any] = {
        "gpu_model": None,
        "gpu_vram_mb": None,
        "cpu_cores": os.cpu_count(),
        "ram_mb": None,
        "region": "auto",
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        capabilities["ram_mb"] = pages * page_size // (1024 * 1024)
    except (ValueError, OSError, AttributeError):
        pass
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi:
        try:
            out = subprocess.run(  # noqa: S603 (a fixed argv from shutil.which)
                [nvidia_smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            name, memory = out.splitlines()[0].rsplit(",", 1)
            capabilities["gpu_model"] = name.strip()
            capabilities["gpu_vram_mb"] = int(float(memory))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    return capabilities


def live_metrics() -> dict[str, Any]:
    """The `system` block of a heartbeat: this host's load, memory and root disk right now."""
    system: dict[str, Any] = {}
    try:
        cores = os.cpu_count() or 1
        system["cpu_percent"] = round(min(100.0, os.getloadavg()[0] / cores * 100), 1)
    except OSError:
        pass
    try:
        meminfo = dict(
            (line.split(":")[0], int(line.split()[1]) // 1024)
            for line in Path("/proc/meminfo").read_text().splitlines()
        )
        system["memory_total_mb"] = meminfo["MemTotal"]
        system["memory_used_mb"] = meminfo["MemTotal"] - meminfo.get(
            "MemAvailable", meminfo.get("MemFree", 0)
        )
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        disk = shutil.disk_usage("/")
        system["disk_total_gb"] = disk.total // 1024**3
        system["disk_used_gb"] = disk.used // 1024**3
    except OSError:
        pass
    return system


@dataclass
class DemoJob:
    """A job taken from the poll: its AssignJob's fields that the demo shows, and its progress."""

    job_id: str
    workload: str
    runtime: str = "container"
    credits: str = ""
    lease_expires_ms: int | None = None
    started: float = field(default_factory=time.monotonic)
    beats: int = 0

    @classmethod
    def of(cls, assigned: dict[str, Any]) -> "DemoJob":
        """The job an entry of the poll's `jobs` describes (the agent's AssignJob plus `credits`)."""
        lease = assigned.get("lease_expires")
        return cls(
            job_id=str(assigned["job_id"]),
            workload=str(assigned.get("workload_id") or "demo"),
            runtime=str(assigned.get("runtime_type") or "container"),
            credits=str(assigned.get("credits") or ""),
            lease_expires_ms=lease if isinstance(lease, int) else None,
        )

    def terms(self) -> str:
        """What the job is and pays, for the line saying it was taken."""
        parts = [f"{self.workload} on {self.runtime}"]
        if self.credits:
            parts.append(f"for {self.credits} credits")
        if self.lease_expires_ms is not None:
            left = self.lease_expires_ms / 1000 - time.time()
            parts.append(f"lease {max(0, round(left))} s")
        return ", ".join(parts)


class Client:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def post(self, path: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(  # noqa: S310 (the operator gives the URL)
            self.base_url + path,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            method="POST",
        )
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read() or b"{}")
            except ValueError:
                body = {"error": f"HTTP {exc.code}"}
            return exc.code, body


class IslandSimulator:
    def __init__(
        self,
        url: str,
        state_path: Path | None = DEFAULT_STATE_PATH,
        out: TextIO = sys.stdout,
        sleep: Callable[[float], None] = time.sleep,
        interval: float = DEFAULT_INTERVAL,
        capacity: int = DEFAULT_CAPACITY,
        runtimes: Sequence[str] = DEFAULT_RUNTIMES,
        state: State | None = None,
        label: str = "",
    ):
        """`state` instead of a `state_path`: an Island already paired, kept in memory only (a fleet)."""
        self.url = url.rstrip("/")
        self.state_path = state_path
        self.state = state if state is not None else State.load(state_path or DEFAULT_STATE_PATH)
        self.out = out
        self.sleep = sleep
        self.interval = interval
        self.capacity = capacity
        self.runtimes = list(runtimes)
        self.label = label
        self.capabilities = detect_hardware()
        self.running: dict[str, DemoJob] = {}

    def say(self, message: str) -> None:
        with _SAY:
            print(f"{self.label}{message}", file=self.out, flush=True)

    def _save_state(self) -> None:
        if self.state_path is not None:
            self.state.save(self.state_path)

    def _post_with_retry(
        self, client: Client, path: str, payload: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        delay = 1.0
        while True:
            try:
                return client.post(path, payload)
            except (urllib.error.URLError, OSError) as exc:
                self.say(f"Coordinator at {self.url} is unreachable ({exc}); retrying in {delay:.0f} s")
                self.sleep(delay)
                delay = min(delay * 2, 30)

    def ensure_paired(self) -> None:
        """Ask for a code, show it, and poll until a user links this Island."""
        if self.state.paired and self.state.token:
            self.say(f"Already paired as Island {self.state.island_id} (host {self.state.host_id}).")
            return
        self.state.coordinator = self.url
        self._save_state()
        client = Client(self.url)
        earlier_secret = None
        while True:
            status, body = self._post_with_retry(
                client,
                "/api/v1/islands/pairing",
                {
                    "host_id": self.state.host_id,
                    "capabilities": self.capabilities,
                    "version": SIMULATOR_VERSION,
                    # Replaces this device's expired code, and no one else's.
                    "device_secret": earlier_secret,
                },
            )
            if status == 409 and "already paired" in str(body.get("error", "")):
                raise SystemExit(
                    "This host is already linked to an account, but its token is not in "
                    f"{self.state_path}. Remove the Island at {self.url}/settings and start again."
                )
            if status != 201:
                raise CoordinatorError(status, body)
            self.say(f"Pairing code: {body['code']}")
            self.say(f"Enter this code at {body['pair_url']}")
            self.say(f"Code expires in {round(body['expires_in_seconds'] / 60)} minutes")
            earlier_secret = body["device_secret"]
            if self._poll(client, earlier_secret, int(body["poll_interval_seconds"])):
                return
            self.say("The code expired before anyone entered it; asking for a new one.")

    def _poll(self, client: Client, device_secret: str, interval: int) -> bool:
        payload = {"host_id": self.state.host_id, "device_secret": device_secret}
        while True:
            self.sleep(interval)
            status, body = self._post_with_retry(client, "/api/v1/islands/pairing/poll", payload)
            if status == 429:
                continue
            if status != 200:
                raise CoordinatorError(status, body)
            if body["status"] == "paired":
                self.state.paired = True
                self.state.island_id = body["island_id"]
                self.state.token = body["token"]
                self._save_state()
                self.say(f"Paired! This machine is now Island {body['island_id']}.")
                return True
            if body["status"] == "expired":
                return False

    def run(self, serve: bool = True) -> None:
        self.say(
            f"Island simulator {SIMULATOR_VERSION}, host {self.state.host_id}, state in {self.state_path}"
        )
        self.ensure_paired()
        if serve:
            self.serve()

    # --- Once paired: heartbeats and demo jobs ---------------------------------

    def _island_client(self) -> Client:
        return Client(self.url, token=self.state.token)

    def _call(self, path: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """One authenticated call; None when the coordinator cannot be reached (tried again next beat)."""
        try:
            status, body = self._island_client().post(path, payload)
        except (urllib.error.URLError, OSError) as exc:
            self.say(f"Coordinator at {self.url} is unreachable ({exc}); trying again in {self.interval:g} s")
            return None
        if status == 401:
            # Keep the host id, drop the dead token: the next start pairs again.
            self.state.paired, self.state.token, self.state.island_id = False, None, None
            self._save_state()
            raise TokenRevoked(
                f"The coordinator no longer accepts this Island's token ({body.get('error')}). "
                "Was it removed at /settings? Start the simulator again to pair anew."
            )
        return status, body

    def heartbeat(self, status: str = "online") -> dict[str, Any]:
        caps = self.capabilities
        system = live_metrics()
        gpus = []
        if caps.get("gpu_vram_mb"):
            gpus.append({"index": 0, "memory_total_mb": caps["gpu_vram_mb"]})
        now = time.monotonic()
        return {
            "host_id": self.state.host_id,
            "status": status,
            "active_jobs": len(self.running),
            "timestamp": int(time.time() * 1000),
            "agent_version": SIMULATOR_VERSION,
            "system": system,
            "gpus": gpus,
            "active_job_metrics": [
                {
                    "job_id": job.job_id,
                    "job_type": job.workload,
                    "duration_ms": int((now - job.started) * 1000),
                }
                for job in self.running.values()
            ],
            "performance_estimates": {
                "supported_runtimes": self.runtimes,
                "max_concurrent_containers": self.capacity,
            },
            # Not in the real agent's heartbeat: restates the hardware so the
            # card shows this machine (see docs/api.md).
            "capabilities": {
                name: caps.get(name) for name in ("gpu_model", "gpu_vram_mb", "cpu_cores", "ram_mb")
            },
        }

    def beat(self) -> int | None:
        """Send a heartbeat; its HTTP status, or None when the coordinator cannot be reached."""
        answer = self._call("/api/v1/islands/heartbeat", self.heartbeat())
        if answer is not None and answer[0] != 200:
            self.say(f"Heartbeat refused: {answer[1].get('error')} (HTTP {answer[0]})")
        return None if answer is None else answer[0]

    def report(self, job: DemoJob, state: str, error: str | None = None) -> bool:
        """Report a job's state; False when the coordinator could not take it now (sent again next beat).

        A refusal (a 4xx: the job was cancelled, moved to another Island or
        is unknown) drops the job: nothing more is reported on it.
        """
        payload = {"job_id": job.job_id, "state": state, "error": error, "timestamp": int(time.time() * 1000)}
        answer = self._call(f"/api/v1/islands/jobs/{job.job_id}/status", payload)
        if answer is None:
            return False
        status, body = answer
        if status == 200:
            self.say(f"Job {job.job_id} ({job.workload}): {state}")
            return True
        if status >= 500 or status == 429:
            self.say(
                f"Job {job.job_id}: could not report '{state}' now ({body.get('error')}, HTTP {status}); "
                "trying again at the next heartbeat"
            )
            return False
        self.say(f"Job {job.job_id}: the coordinator refused '{state}': {body.get('error')} (HTTP {status})")
        self.running.pop(job.job_id, None)
        return True

    def advance_jobs(self) -> None:
        """One step of each running demo job: streaming, then its end; a step not taken is tried again."""
        for job in list(self.running.values()):
            if job.beats + 1 < DEMO_JOB_BEATS:
                state, error = "streaming", None
            elif "fail" in job.workload:
                state, error = "failed", "demo failure: the workload's name asks for one"
            else:
                state, error = "succeeded", None
            if not self.report(job, state, error):
                continue
            job.beats += 1
            if state != "streaming":
                self.running.pop(job.job_id, None)

    def poll(self) -> dict[str, Any] | None:
        """The jobs poll's answer (`jobs` placed here, not started; `cancelled` job ids), or None."""
        answer = self._call("/api/v1/islands/jobs/poll", {})
        if answer is None or answer[0] != 200:
            return None
        return answer[1]

    def stop_cancelled(self, polled: dict[str, Any]) -> None:
        """Stop the running jobs the dispatcher withdrew. Nothing more is reported on them."""
        for job_id in polled.get("cancelled", []):
            job = self.running.pop(str(job_id), None)
            if job is not None:
                self.say(f"Job {job.job_id} ({job.workload}): cancelled by the dispatcher; stopped")

    def start_jobs(self, polled: dict[str, Any]) -> None:
        for assigned in polled.get("jobs", []):
            if assigned["job_id"] in self.running:
                continue
            job = DemoJob.of(assigned)
            self.running[job.job_id] = job
            self.say(f"Took job {job.job_id}: {job.terms()}")
            # Not taken now (the coordinator is busy): its next step says it runs.
            self.report(job, "started")

    def sign_off(self) -> None:
        """Tell the coordinator this Island is going away, so it shows as signed off at once."""
        try:
            status, _ = self._island_client().post("/api/v1/islands/heartbeat", self.heartbeat("offline"))
        except (urllib.error.URLError, OSError) as exc:
            self.say(f"Could not sign off ({exc}); the coordinator will notice the silence instead.")
            return
        if status == 200:
            self.say("Signed off: the coordinator shows this Island as offline.")

    def serve(self) -> None:
        """Heartbeat, run demo jobs, repeat; sign off when stopped by Ctrl-C or SIGTERM."""
        self.say(f"Sending a heartbeat every {self.interval:g} s. Ctrl-C stops (and signs off).")
        try:
            while True:
                if self.beat() is None:
                    # Unreachable: nothing else would get through either.
                    self.sleep(self.interval)
                    continue
                # Cancels first, so a withdrawn job is never reported on again.
                polled = self.poll()
                if polled is not None:
                    self.stop_cancelled(polled)
                self.advance_jobs()
                if polled is not None:
                    self.start_jobs(polled)
                self.sleep(self.interval)
        except KeyboardInterrupt:
            self.finish_jobs()
            self.sign_off()
            raise

    def finish_jobs(self) -> None:
        """Stopping with jobs in flight: take no new ones, and report those running through to their end.

        A job left running would hold its slot until its lease ran out and
        the watcher moved it, so a demo fleet run again soon after would find
        its Islands full. At most DEMO_JOB_BEATS steps; a second Ctrl-C
        leaves what is still running to the leases.
        """
        if not self.running:
            return
        self.say(f"Finishing {len(self.running)} job(s) in flight before signing off.")
        try:
            for _ in range(DEMO_JOB_BEATS):
                # Not self.sleep: in a fleet it ends at once once the fleet stops.
                time.sleep(self.interval)
                if self.beat() is None:
                    break
                polled = self.poll()
                if polled is not None:
                    self.stop_cancelled(polled)
                self.advance_jobs()
                if not self.running:
                    return
        except KeyboardInterrupt:
            pass
        self.say(f"Left {len(self.running)} job(s) running: their leases run out and the watcher moves them.")
