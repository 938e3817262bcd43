"""Group commit: requests arriving together share one transaction.

Under daphne every synchronous view runs in a thread of its own. Without
this, each heartbeat pays for its own token lookup, locking read, UPDATE and
COMMIT, and compiling those queries costs more CPU than Django's whole
request cycle (docs/performance.md has the profile). With it, the first
request to arrive writes its beat at once (the *leader*); requests arriving
while that transaction runs queue up, and when it commits the oldest of them
leads the next batch, which takes everything queued by then. A batch is one
call of `write`, so under load the statements and the commit are shared by
dozens of requests, and at low load a request waits for nobody.

Every request still waits for the commit of the batch that holds its item
and gets that item's own result, so a success still means "written". If the
batch fails, every request in it fails: nothing of the batch was written.
A leader writes on its own thread, so it uses its own request's database
connection, exactly as a plain view would; followers touch no connection.

`asubmit` is the same for async views: a follower waits in the event loop,
on no thread at all, and only a leader hops to its request's thread to
write (docs/performance.md counts the hops). Sync and async requests share
one queue.
"""

import asyncio
import threading
from collections.abc import Callable, Sequence

from asgiref.sync import sync_to_async


class GroupCommitFailed(Exception):
    """The batch holding this request's item failed; the cause is chained."""


class _Pending[T, R]:
    __slots__ = ("error", "future", "item", "lead", "loop", "result", "woken")

    def __init__(self, item: T, loop: asyncio.AbstractEventLoop | None = None):
        self.item = item
        # A sync request waits on an Event in its thread; an async one on a
        # future of its event loop, which the leader's thread resolves.
        self.woken = threading.Event()
        self.loop = loop
        self.future: asyncio.Future[None] | None = loop.create_future() if loop else None
        # Set by the previous leader when this request is to lead the next batch.
        self.lead = False
        self.result: R | None = None
        self.error: BaseException | None = None

    def wake(self) -> None:
        if self.loop is None:
            self.woken.set()
        else:
            self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        # Already cancelled when its request went away (see _abandon).
        if self.future is not None and not self.future.done():
            self.future.set_result(None)


class GroupCommit[T, R]:
    """Run `write(items) -> results` (one result per item, in order) for batches of concurrent items."""

    def __init__(self, write: Callable[[Sequence[T]], Sequence[R]], max_batch: int = 200):
        self._write = write
        self._max_batch = max_batch
        self._lock = threading.Lock()
        # Invariant: the queue is empty whenever nobody is writing, so the
        # request that finds nobody writing is first in the queue.
        self._queue: list[_Pending[T, R]] = []
        self._writing = False

    def submit(self, item: T) -> R:
        """Write `item` in the next batch and return its result once that batch committed."""
        pending: _Pending[T, R] = _Pending(item)
        with self._lock:
            self._queue.append(pending)
            leads = not self._writing
            self._writing = True
        if not leads:
            pending.woken.wait()
        if leads or pending.lead:
            self._lead()
        if pending.error is not None:
            if pending.lead or leads:
                raise pending.error
            raise GroupCommitFailed("the batch holding this item failed") from pending.error
        return pending.result  # type: ignore[return-value]

    async def asubmit(self, item: T) -> R:
        """`submit` for async code: wait in the event loop, hop to a thread only to lead a batch.

        The leader writes through sync_to_async, on its request's thread
        under daphne, so it uses that request's database connection as a
        sync view would.
        """
        pending: _Pending[T, R] = _Pending(item, asyncio.get_running_loop())
        with self._lock:
            self._queue.append(pending)
            leads = not self._writing
            self._writing = True
        if not leads:
            assert pending.future is not None
            try:
                await pending.future
            except asyncio.CancelledError:
                self._abandon(pending)
                raise
        if leads or pending.lead:
            # Shielded: a request whose client hung up is cancelled (Django
            # does), and a write cancelled before its thread started it would
            # never run, leaving nobody to lead again. The write goes on, and
            # wakes the others and passes on the lead, whoever is listening.
            await asyncio.shield(sync_to_async(self._lead)())
        if pending.error is not None:
            if pending.lead or leads:
                raise pending.error
            raise GroupCommitFailed("the batch holding this item failed") from pending.error
        return pending.result  # type: ignore[return-value]

    def _abandon(self, pending: _Pending[T, R]) -> None:
        """A waiting request went away (its client hung up): take its item back, pass on its lead.

        An item already in a batch is written all the same, its result
        unread. One still queued is dropped (nobody is told it was written);
        had it just been made the next leader, the lead goes to the next in
        the queue, so the queue never waits for a request that is gone.
        """
        successor: _Pending[T, R] | None = None
        with self._lock:
            if pending not in self._queue:
                return
            self._queue.remove(pending)
            if not pending.lead:
                return
            if self._queue:
                successor = self._queue[0]
                successor.lead = True
            else:
                self._writing = False
        if successor is not None:
            successor.wake()

    def _lead(self) -> None:
        with self._lock:
            # The leader is first in the queue (see the invariant), so its own
            # item is always in the batch it writes.
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
        successor: _Pending[T, R] | None = None
        try:
            results = self._write([pending.item for pending in batch])
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
        except BaseException as exc:
            for pending in batch:
                pending.error = exc
        finally:
            with self._lock:
                if self._queue:
                    successor = self._queue[0]
                    successor.lead = True
                else:
                    self._writing = False
            for pending in batch[1:]:
                pending.wake()
            if successor is not None:
                successor.wake()
