import uuid
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from archipelag.sockets import session_user
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

    A handshake costs one trip to the database thread (the user and the
    session, read in one call): under a burst of pages opening at once,
    each hop is a wait for a thread of the pool.
    """

    # Set once the socket is known to be its owner's; until then nothing is relayed.
    group_name: str | None = None

    async def connect(self) -> None:
        # Accept first: a close code only reaches the browser after the handshake.
        await self.accept()
        session_id: uuid.UUID = self.scope["url_route"]["kwargs"]["session_id"]
        group_name = MobilePairingSession.group_for(session_id)
        # Join before reading: a redemption that commits before the read is in
        # the snapshot, and one after it sends an event that waits for us. The
        # channel layer is at-most-once, so the database, not the event, is
        # what the page starts from.
        await self.channel_layer.group_add(group_name, self.channel_name)
        found = await database_sync_to_async(self.find_session)(session_id)
        if isinstance(found, int):
            await self.channel_layer.group_discard(group_name, self.channel_name)
            await self.close(code=found)
            return
        self.group_name = group_name
        await self.send_json(found.snapshot())

    def find_session(self, session_id: uuid.UUID) -> MobilePairingSession | int:
        """The session if it is the signed-in user's, else the close code that says why not."""
        user = session_user(self.scope)
        if not user.is_authenticated:
            return CLOSE_UNAUTHENTICATED
        sessions = MobilePairingSession.objects.owned_by(user).select_related("island")
        # Unknown and someone else's get the same answer.
        return sessions.filter(pk=session_id).first() or CLOSE_FORBIDDEN

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
        # Events reach a socket that joined the group before its owner was
        # checked; one refused meanwhile must not see them.
        if self.group_name is not None:
            await self.send_json(event["snapshot"])
