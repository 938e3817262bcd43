"""The wire format of the Archipelag.io mobile app, as msgspec Structs.

The app's own format is not public; this is the coordinator's side of it,
documented in docs/api.md. As with the desktop agent, unknown fields are
ignored and bounds keep absurd values out of the database.
"""

from typing import Annotated, Literal

import msgspec

from archipelag.api import NO_NUL_PATTERN
from islands.agent import Capabilities, Cores, HostId, Label, Megabytes, ShortText, Text

Model = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=NO_NUL_PATTERN)]
Accelerator = Label
# A scan secret is 43 characters; the bound only stops absurd bodies.
Secret = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class MobileDevice(msgspec.Struct):
    platform: Literal["ios", "android"]
    model: Model
    runtime: Literal["coreml", "onnx"]
    os_version: ShortText | None = None
    # "ane" (Apple Neural Engine), "nnapi", "gpu", ...
    accelerator: Accelerator | None = None
    cpu_cores: Cores | None = None
    ram_mb: Megabytes | None = None

    def capabilities(self) -> Capabilities:
        """The phone as an Island's hardware (its platform is kept apart)."""
        return Capabilities(
            device_model=self.model,
            os_version=self.os_version,
            runtime=self.runtime,
            accelerator=self.accelerator,
            cpu_cores=self.cpu_cores,
            ram_mb=self.ram_mb,
        )


class MobilePairRequest(msgspec.Struct):
    """Body of POST /api/v1/mobile/pair: exactly one of `code` and `secret`."""

    host_id: HostId
    device: MobileDevice
    # What a person typed; normalised like desktop codes.
    code: Text | None = None
    # The scan secret from the QR code's fragment.
    secret: Secret | None = None
