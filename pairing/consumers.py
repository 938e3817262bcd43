from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from pairing.models import MobilePairingSession

# Close codes in the 4000-4999 range are the application's own. They mirror
# HTTP's 401 and 403 so the page can tell "sign in again" from "not yours".
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403


class MobilePairingConsumer(AsyncJsonWebsocketConsumer):
    """Relays a mobile pairing session's state to its owner's /pair/mobile page.

    It holds no pairing logic: it checks who is asking, sends the snapshot the
    model computes, then passes on what MobilePairingSession.announce() sends
    to the session's group. Messages from the browser are ignored.
    """

    group_name: str | None = None

    async def connect(self) -> None:
        # Accept first: a close code only reaches the browser after the handshake.
        await self.accept()
        user = self.scope["user"]
        if not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        sessions = MobilePairingSession.objects.owned_by(user).select_related("island")
        session_id = self.scope["url_route"]["kwargs"]["session_id"]
        session = await sessions.filter(pk=session_id).afirst()
        if session is None:
            # Unknown and someone else's get the same answer.
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.group_name = session.group_name
        await self.channel_layer.group_add(self.group_name, self.channel_name)
        # Read the session again now that we are in the group: a redemption that
        # committed before this read is in the snapshot, and one after it sends
        # an event that waits for us. The channel layer is at-most-once, so the
        # database, not the event, is what the page starts from.
        session = await sessions.aget(pk=session_id)
        await self.send_json(session.snapshot())

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        # Ignored unread. The JSON consumer would decode every frame first,
        # and a frame that is not JSON text (binary, empty, garbage) would
        # raise and end the socket with a server error.
        return

    async def disconnect(self, code: int) -> None:
        if self.group_name is not None:
            await self.channel_layer.group_discard(self.group_name, self.channel_name)

    async def pairing_snapshot(self, event: dict[str, Any]) -> None:
        await self.send_json(event["snapshot"])
