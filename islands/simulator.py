"""A stand-in for the Island software that speaks the coordinator's HTTP API.

It uses only the standard library, so it runs against any coordinator, and
keeps its identity in a state file the way the real agent keeps
~/.island/state.json: a restart neither asks for a new code nor forgets
which Island it is.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

DEFAULT_STATE_PATH = Path.home() / ".island" / "state.json"
SIMULATOR_VERSION = "sim-0.1.0"


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
        state_path: Path = DEFAULT_STATE_PATH,
        out: TextIO = sys.stdout,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.url = url.rstrip("/")
        self.state_path = state_path
        self.state = State.load(state_path)
        self.out = out
        self.sleep = sleep
        self.capabilities = detect_hardware()

    def say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

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
        self.state.save(self.state_path)
        client = Client(self.url)
        while True:
            status, body = self._post_with_retry(
                client,
                "/api/v1/islands/pairing",
                {
                    "host_id": self.state.host_id,
                    "capabilities": self.capabilities,
                    "version": SIMULATOR_VERSION,
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
            if self._poll(client, body["device_secret"], int(body["poll_interval_seconds"])):
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
                self.state.save(self.state_path)
                self.say(f"Paired! This machine is now Island {body['island_id']}.")
                return True
            if body["status"] == "expired":
                return False

    def run(self) -> None:
        self.say(
            f"Island simulator {SIMULATOR_VERSION}, host {self.state.host_id}, state in {self.state_path}"
        )
        self.ensure_paired()
