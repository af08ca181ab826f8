"""The hub: run id -> the clients watching it, fed by one backend subscription per run.

Each process subscribes once per active run (not per client) and fans every message out to the
clients' bounded queues. Live delivery is the fast path; the run's stored history is the truth.
A client catches up from history when it joins, when the backend resubscribed after an outage,
when it sees a gap in ``seq`` and when its queue overflowed, so it receives every event exactly
once and in order, and a slow client costs bounded memory and never holds the others back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from itertools import islice
from typing import Any, Final

from prefect_ws import closecodes, metrics
from prefect_ws.events import Frame, frame_from_text, frames_from_message
from prefect_ws.transport import RESYNC, Transport

logger = logging.getLogger("prefect_ws.hub")


RECENT_FRAMES: Final = 1024  # per active run: ~500 KB of ~250-byte events (text and wire bytes)


class _Resync:
    """Queue marker: read history from the last delivered ``seq`` before going on."""


RESYNC_MARK: Final = _Resync()


class StreamClosed(Exception):
    """The stream must end with this WebSocket close code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ClientLagging(StreamClosed):
    """The client stayed behind too long or fell out of the retained history."""

    def __init__(self, reason: str) -> None:
        super().__init__(closecodes.TRY_AGAIN_LATER, f"{reason}; reconnect with since=<last seq>")


class Subscription:
    """One client's position in one run, and the live frames waiting for it.

    The queue holds whole backend messages (lists of frames with consecutive ``seq``), as the
    run's pump received them: the same list objects go to every client of the run, and a
    client that fell behind takes everything queued at once (:meth:`take`).
    """

    def __init__(self, run_id: str, *, since: int, queue_size: int) -> None:
        self.run_id = run_id
        self.last_seq = since
        self.sent = 0
        self.finished = False
        self.behind_since: float | None = None
        self._queue_size = queue_size
        self._queue: deque[list[Frame] | _Resync | StreamClosed] = deque()
        self._queued = 0  # frames in the queue
        self._ready = asyncio.Event()

    def offer(self, frames: list[Frame]) -> None:
        """Called by the run's pump for every live message; never blocks."""
        # One message is always taken whole when the client is level: a publisher's batch may
        # exceed the queue, and treating it as overflow sent every client to history.
        if self._queued and self._queued + len(frames) > self._queue_size:
            # Overflow: drop the backlog and fetch it from history when the client can take it.
            self._reset(RESYNC_MARK)
            if self.behind_since is None:
                self.behind_since = time.monotonic()
        else:
            self._queue.append(frames)
            self._queued += len(frames)
        self._ready.set()

    def abort(self, code: int, reason: str) -> None:
        """End the stream at once (server shutting down, client gone, token expired)."""
        self._reset(StreamClosed(code, reason))
        self._ready.set()

    def resync(self) -> None:
        if not self._queue or self._queue[-1] is not RESYNC_MARK:
            self._queue.append(RESYNC_MARK)
        self._ready.set()

    def _reset(self, item: _Resync | StreamClosed) -> None:
        self._queue.clear()
        self._queued = 0
        self._queue.append(item)

    def advance(self, frames: list[Frame]) -> None:
        last = frames[-1]
        self.last_seq = last.seq
        self.sent += len(frames)
        if last.is_final:
            self.finished = True

    def caught_up(self) -> None:
        if RESYNC_MARK not in self._queue:
            self.behind_since = None

    def check_lag(self, max_lag_seconds: float) -> None:
        if self.behind_since is not None and time.monotonic() - self.behind_since > max_lag_seconds:
            raise ClientLagging(f"client stayed behind for over {max_lag_seconds:g} s")

    async def take(self) -> list[Frame] | _Resync:
        """Every queued live frame that follows on from the first queued message, or a marker."""
        queue = self._queue
        while not queue:
            self._ready.clear()
            await self._ready.wait()
        item = queue.popleft()
        if isinstance(item, StreamClosed):
            raise item
        if isinstance(item, _Resync):
            return item
        self._queued -= len(item)
        if not queue or not isinstance(queue[0], list) or queue[0][0].seq != item[-1].seq + 1:
            return item  # the common case: one message, shared with the run's other clients
        frames = list(item)
        while queue and isinstance(queue[0], list) and queue[0][0].seq == frames[-1].seq + 1:
            more = queue.popleft()
            assert isinstance(more, list)
            self._queued -= len(more)
            frames += more
        return frames


def _until_final(frames: list[Frame]) -> list[Frame]:
    """``frames`` up to and including ``run_complete``: nothing of a run follows it."""
    for index, frame in enumerate(frames):
        if frame.is_final:
            return frames if index == len(frames) - 1 else frames[: index + 1]
    return frames


def _consecutive(frames: list[Frame]) -> list[list[Frame]]:
    """A message's frames in runs of consecutive ``seq`` (one run, unless a backend misbehaves)."""
    if frames[-1].seq - frames[0].seq == len(frames) - 1:
        return [frames]
    runs: list[list[Frame]] = [[frames[0]]]
    for frame in frames[1:]:
        if frame.seq == runs[-1][-1].seq + 1:
            runs[-1].append(frame)
        else:
            runs.append([frame])
    return runs


class RunChannel:
    """The single backend subscription of one run in this process."""

    def __init__(self, hub: Hub, run_id: str) -> None:
        self.hub = hub
        self.run_id = run_id
        self.subscriptions: set[Subscription] = set()
        # The newest live frames: a client a little behind catches up from here, not Redis.
        self.recent: deque[Frame] = deque(maxlen=RECENT_FRAMES)
        self.live = False
        self.closing = False
        self.done = asyncio.Event()
        self._subscriber: Any = None
        self.task = asyncio.create_task(self._pump(), name=f"prefect-ws run {run_id}")

    def add(self, subscription: Subscription) -> None:
        self.subscriptions.add(subscription)
        if self.live:
            subscription.resync()  # otherwise the backend's RESYNC on subscribe does it

    def close(self) -> None:
        """Unsubscribe once the pump is idle: no cancellation in the middle of a Redis command.

        (Cancelling the pump while broadcaster was subscribing or unsubscribing left it
        waiting forever on a dead subscription, and the run's next stream with it.)
        """
        self.closing = True
        if self._subscriber is not None:
            self._subscriber._queue.put_nowait(None)  # broadcaster's end-of-subscription mark

    def _go_live(self) -> None:
        """History and live now meet: every client reconciles from history."""
        self.recent.clear()  # events may have been missed before this point
        self.live = True
        for subscription in self.subscriptions:
            subscription.resync()

    def _deliver(self, frames: list[Frame]) -> None:
        recent = self.recent
        if recent and frames[0].seq != recent[-1].seq + 1:
            recent.clear()  # a gap: the ring only ever holds a consecutive range
        recent.extend(frames)
        for subscription in self.subscriptions:
            subscription.offer(frames)

    async def _pump(self) -> None:
        try:
            subscription: Any = self.hub.transport.broadcast.subscribe(self.run_id)
            async with subscription as subscriber:
                self._subscriber = subscriber
                if self.closing:
                    return  # every client left while we were subscribing
                if self.hub.transport.backend.is_live(self.run_id):
                    self._go_live()  # its RESYNC may have come before broadcaster listened
                async for event in subscriber:
                    if event.message == RESYNC:
                        self._go_live()
                        continue
                    try:
                        frames = frames_from_message(event.message)
                    except ValueError:
                        logger.warning("Ignoring a malformed message on run %s", self.run_id)
                        continue
                    metrics.received(len(frames))
                    for run in _consecutive(frames):
                        self._deliver(_until_final(run))
        except asyncio.CancelledError:
            pass
        except Exception:  # a backend error must not leave the run wedged for later clients
            logger.exception("Subscription to run %s failed", self.run_id)
        finally:
            self.live = False
            if self.hub.runs.get(self.run_id) is self:
                del self.hub.runs[self.run_id]
            self.done.set()


class Hub:
    """Registry of run channels for one server process."""

    def __init__(
        self, transport: Transport, *, replay_page_size: int = 500, max_lag_seconds: float = 30.0
    ) -> None:
        self.transport = transport
        self.runs: dict[str, RunChannel] = {}
        self.replay_page_size = replay_page_size
        self.max_lag_seconds = max_lag_seconds

    @contextlib.asynccontextmanager
    async def attach(self, subscription: Subscription) -> AsyncIterator[RunChannel]:
        """Register a client on its run, subscribing the process to the run if it is the first."""
        run_id = subscription.run_id
        while True:
            channel = self.runs.get(run_id)
            if channel is None:
                channel = self.runs[run_id] = RunChannel(self, run_id)
                break
            if not channel.closing:
                break
            await channel.done.wait()  # let the old subscription unwind before re-subscribing
        channel.add(subscription)
        try:
            yield channel
        finally:
            channel.subscriptions.discard(subscription)
            if not channel.subscriptions and not channel.closing:
                channel.close()

    async def close(self) -> None:
        channels = list(self.runs.values())
        for channel in channels:
            for subscription in channel.subscriptions:
                subscription.abort(closecodes.GOING_AWAY, "server shutting down")
            channel.close()
            channel.task.cancel()
        await asyncio.gather(*(c.task for c in channels), return_exceptions=True)

    async def catch_up(
        self, subscription: Subscription, *, initial: bool = False
    ) -> AsyncIterator[list[Frame]]:
        """Frames after ``subscription.last_seq``, in pages: from the run's recent frames when
        they reach back far enough, else from the backend's history."""
        channel = self.runs.get(subscription.run_id)
        recent = channel.recent if channel is not None else None
        wanted = subscription.last_seq + 1
        if recent and not initial and recent[0].seq <= wanted <= recent[-1].seq:
            yield _until_final(list(islice(recent, wanted - recent[0].seq, None)))
            return
        backend = self.transport.backend
        cursor = subscription.last_seq
        while True:
            texts = await backend.history(subscription.run_id, cursor, self.replay_page_size)
            page: list[Frame] = []
            for text in texts:
                frame = frame_from_text(text)
                if frame.seq <= cursor:
                    continue
                if frame.seq != cursor + 1 and not (initial and not page):
                    raise ClientLagging(f"events after seq {cursor} are no longer retained")
                cursor = frame.seq
                page.append(frame)
                if frame.is_final:
                    break
            if page:
                yield page
                initial = False
            if len(texts) < self.replay_page_size or (page and page[-1].is_final):
                if not texts and subscription.last_seq > 0:
                    await self._check_history_kept(subscription)
                return

    async def _check_history_kept(self, subscription: Subscription) -> None:
        """A client is level: unless the run's counter went backwards (Redis came back empty)."""
        info = await self.transport.backend.info(subscription.run_id)
        if info.head < subscription.last_seq:
            raise StreamClosed(
                closecodes.INTERNAL_ERROR,
                # A close reason is at most 123 bytes.
                f"run history was lost (backend restarted empty: head {info.head} < "
                f"{subscription.last_seq}); reconnect with since=0",
            )

    async def batches(self, subscription: Subscription) -> AsyncIterator[list[Frame]]:
        """Every frame of the run after ``since``, once each and in order, until ``run_complete``,
        in batches of consecutive frames: as they came from the backend, or a backlog at once.

        Raises :class:`ClientLagging` when the client cannot be brought level.
        """
        initial = True
        while not subscription.finished:
            subscription.check_lag(self.max_lag_seconds)
            item = await subscription.take()
            if isinstance(item, list):
                first = item[0].seq
                if first <= subscription.last_seq:  # partly delivered from history already
                    item = item[subscription.last_seq - first + 1 :]
                    if not item:
                        continue
                    first = item[0].seq
                if first == subscription.last_seq + 1:
                    subscription.advance(item)
                    metrics.delivered_live(item)
                    yield item
                    continue
            # A resync marker, or a gap in live seq: history has everything up to the newest.
            metrics.replay_started()
            async for page in self.catch_up(subscription, initial=initial):
                subscription.advance(page)
                metrics.delivered_replay(len(page))
                yield page
                if subscription.finished:
                    return
                subscription.check_lag(self.max_lag_seconds)
            initial = False
            subscription.caught_up()
