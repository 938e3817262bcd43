from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.utils import timezone

from islands.models import Island, fleet_group

# The application's own close code, as on the pairing socket: "sign in again".
CLOSE_UNAUTHENTICATED = 4401


class FleetConsumer(AsyncJsonWebsocketConsumer):
    """Tells a signed-in user's "Your Islands" page when one of their Islands changes.

    It holds no logic: it checks who is asking, joins the account's group,
    sends a snapshot of every Island's status and counters (`live_key`),
    then relays what `islands.models.announce_fleet` sends: the ids of the
    Islands whose status changed or whose job ended. The page renders the
    list again from the server when anything differs. Messages from the
    browser are ignored.
    """

    group_name: str | None = None

    async def connect(self) -> None:
        # Accept first: a close code only reaches the browser after the handshake.
        await self.accept()
        user = self.scope["user"]
        if not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.group_name = fleet_group(user.pk)
        await self.channel_layer.group_add(self.group_name, self.channel_name)
        # Read after joining the group: a change committed before this read is
        # in the snapshot, and one after it sends an event that waits for us.
        now = timezone.now()
        islands = Island.objects.owned_by(user).only(
            "status",
            "last_heartbeat_at",
            "offline_after",
            "removed_at",
            "suspended_at",
            "jobs_completed",
            "jobs_failed",
            "earnings",
            "karma",
            "maintenance_until",
        )
        snapshot = {str(island.pk): island.live_key(now) async for island in islands}
        await self.send_json({"type": "snapshot", "at": now.isoformat(), "islands": snapshot})

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        # Ignored unread, as on the pairing socket: a frame that is not JSON
        # would otherwise end the socket with a server error.
        return

    async def disconnect(self, code: int) -> None:
        if self.group_name is not None:
            await self.channel_layer.group_discard(self.group_name, self.channel_name)

    async def fleet_changed(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "changed", "islands": event["islands"]})
