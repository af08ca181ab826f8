"""The hub: run id -> the clients watching it, fed by one backend subscription per run.

Each process subscribes once per active run (not per client) and fans every message out to the
clients' bounded queues, from one listener task for all runs. Live delivery is the fast path;
the run's stored history is the truth. A client catches up from history when it joins, when the
backend resubscribed after an outage, when it sees a gap in ``seq`` and when its queue
overflowed, so it receives every event exactly once and in order, and a slow client costs
bounded memory and never holds the others back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from itertools import islice
from typing import Final

from prefect_ws.backends import RESYNC, Transport
from prefect_ws.protocol import closecodes
from prefect_ws.protocol.events import Frame, frames_from_message
from prefect_ws.protocol.frames import WRITE_SIZE
from prefect_ws.server import metrics
from prefect_ws.server.history import HistoryPages

logger = logging.getLogger("prefect_ws.hub")


RECENT_FRAMES: Final = 1024  # per active run: ~500 KB of ~250-byte events (text and wire bytes)
# Beyond RECENT_FRAMES, the frames a client that is behind still needs are kept, up to this
# much event text per run (about as much again in wire bytes): in a burst, clients that fell
# behind catch up from memory, built once, instead of each reading the history from the backend.
RECENT_MAX_BYTES: Final = 4 * 1024 * 1024
RECENT_PAGE: Final = 1024  # frames per catch-up batch from memory: one list per client at a time


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
    hub's listener received them: the same list objects go to every client of the run, and a
    client that fell behind takes everything queued at once (:meth:`take`). The queue exists
    only while something is queued: an empty ``deque`` holds a 64-slot block, and most
    connections wait with nothing queued.
    """

    __slots__ = (
        "__weakref__",
        "_loop",
        "_queue",
        "_queue_size",
        "_queued",
        "_waiter",
        "behind_since",
        "epoch",
        "finished",
        "last_seq",
        "run_id",
        "sent",
        "writer",
        "written",
    )

    def __init__(self, run_id: str, *, since: int, queue_size: int) -> None:
        self.run_id = run_id
        # Set by a stream whose server writes pre-built frames at once: see wrote_now().
        self.writer: Callable[[bytes], bool] | None = None
        self.written = 0  # events written by wrote_now()
        self.last_seq = since
        self.epoch: str | None = None  # the history's epoch when the stream started
        self.sent = 0
        self.finished = False
        # While the client is behind: when it last made progress (see check_lag).
        self.behind_since: float | None = None
        self._queue_size = queue_size
        self._queue: deque[list[Frame] | _Resync | StreamClosed] | None = None
        self._queued = 0  # frames in the queue
        self._waiter: asyncio.Future[None] | None = None  # while the stream waits: no Event kept
        # Kept from the first wait: asyncio.get_running_loop() makes a getpid system call.
        self._loop: asyncio.AbstractEventLoop | None = None

    def wrote_now(self, frames: list[Frame], wire: bytes) -> bool:
        """Write a live message (``wire``: its frames' bytes) at once if the client is level;
        the caller counts it delivered. Otherwise nothing is done: :meth:`offer` it.

        Level: the client's task waits (:meth:`waiter`) with nothing queued, so everything
        before was written. Waking that task to pass one event through the stream
        and the ASGI send was most of the server's CPU per delivered event when events come
        one at a time. ``writer`` writes only while the connection takes data at once. The
        caller never passes ``run_complete``: it ends the stream, so it goes through the task.
        """
        if (
            self.writer is not None
            and self._waiter is not None
            and not self._queue
            and frames[0].seq == self.last_seq + 1
            and self.writer(wire)
        ):
            self.advance(frames)
            self.written += len(frames)
            return True
        return False

    def offer(self, frames: list[Frame]) -> None:
        """Called by the hub's listener for every live message of the run; never blocks."""
        # One message is always taken whole when the client is level: a publisher's batch may
        # exceed the queue, and treating it as overflow sent every client to history.
        if self._queued and self._queued + len(frames) > self._queue_size:
            # Overflow: drop the backlog and fetch it from history when the client can take it.
            self._reset(RESYNC_MARK)
            if self.behind_since is None:
                self.behind_since = time.monotonic()
        else:
            self._append(frames)
            self._queued += len(frames)
        self._wake()

    def _append(self, item: list[Frame] | _Resync | StreamClosed) -> None:
        if self._queue is None:
            self._queue = deque((item,))
        else:
            self._queue.append(item)

    def abort(self, code: int, reason: str) -> None:
        """End the stream at once (server shutting down, client gone, token expired)."""
        self._reset(StreamClosed(code, reason))
        self._wake()

    def resync(self) -> None:
        if not self._queue or self._queue[-1] is not RESYNC_MARK:
            self._append(RESYNC_MARK)
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _reset(self, item: _Resync | StreamClosed) -> None:
        if self._queue is not None:
            self._queue.clear()
        self._queued = 0
        self._append(item)

    def advance(self, frames: list[Frame]) -> None:
        last = frames[-1]
        self.last_seq = last.seq
        self.sent += len(frames)
        if last.is_final:
            self.finished = True

    def progressed(self) -> None:
        """The client took a batch: while it is behind, the lag limit counts from here. A
        client behind a long burst (fed from the recent frames or history, page after page)
        is never cut while it keeps reading; a write it stops reading in is the watchdog's."""
        if self.behind_since is not None:
            self.behind_since = time.monotonic()

    def caught_up(self) -> None:
        if not self._queue or RESYNC_MARK not in self._queue:
            self.behind_since = None

    def check_lag(self, max_lag_seconds: float) -> None:
        """Raise :class:`ClientLagging` when the client is behind and made no progress for
        ``max_lag_seconds``: not when it has been behind that long, which a reading client
        catching up on a burst larger than its queue always was."""
        if self.behind_since is not None and time.monotonic() - self.behind_since > max_lag_seconds:
            raise ClientLagging(f"client made no progress for over {max_lag_seconds:g} s")

    def waiter(self) -> asyncio.Future[None] | None:
        """None when something is queued for :meth:`take`; else a future resolved when
        something is. The stream's task awaits the future itself: a waiting stream holds no
        coroutine of this object's."""
        if self._queue:
            return None
        waiter = self._waiter
        if waiter is None or waiter.done():
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
        return waiter

    def take(self) -> list[Frame] | _Resync:
        """Every queued live frame that follows on from the first queued message, or a marker;
        call when :meth:`waiter` says something is queued."""
        queue = self._queue
        assert queue, "nothing queued: await waiter() first"
        item = queue.popleft()
        if not queue:
            self._queue = None
        if isinstance(item, StreamClosed):
            # Not kept in this frame: the exception's traceback holds the frame, and that cycle
            # would keep the connection's stream state until the cycle collector runs.
            try:
                raise item
            finally:
                del item
        if isinstance(item, _Resync):
            return item
        self._queued -= len(item)
        # Usually one message, the list shared with the run's other clients: never mutated.
        frames = item
        while queue and isinstance(queue[0], list) and queue[0][0].seq == frames[-1].seq + 1:
            more = queue.popleft()
            assert isinstance(more, list)
            self._queued -= len(more)
            frames = frames + more
        if not queue:
            self._queue = None
        return frames


def _until_final(frames: list[Frame]) -> list[Frame]:
    """``frames`` up to and including ``run_complete``: nothing of a run follows it."""
    for index, frame in enumerate(frames):
        if frame.is_final:
            return frames if index == len(frames) - 1 else frames[: index + 1]
    return frames


def _following(frames: list[Frame], cursor: int, *, initial: bool) -> list[Frame]:
    """A history page's frames after ``cursor``: from ``cursor + 1`` on, or, on a stream's first
    read (``initial``), from wherever the retained history starts; ClientLagging on a gap.

    A page as stored is consecutive, and ``run_complete`` can only be its last frame (a
    backend stores nothing after it), so each client takes a slice and checks one frame.
    """
    if not frames or frames[-1].seq - frames[0].seq != len(frames) - 1:
        return _following_gaps(frames, cursor, initial=initial)
    page = frames[max(0, cursor + 1 - frames[0].seq) :]
    if page and page[0].seq != cursor + 1 and not initial:
        raise ClientLagging(f"events after seq {cursor} are no longer retained")
    return page


def _following_gaps(frames: list[Frame], cursor: int, *, initial: bool) -> list[Frame]:
    """:func:`_following` for a page with gaps in ``seq`` (a backend that misbehaves)."""
    page: list[Frame] = []
    for frame in frames:
        if frame.seq <= cursor:
            continue
        if frame.seq != cursor + 1 and not (initial and not page):
            raise ClientLagging(f"events after seq {cursor} are no longer retained")
        cursor = frame.seq
        page.append(frame)
        if frame.is_final:
            break
    return page


def _joined_wire(frames: list[Frame]) -> bytes | None:
    """The frames' wire bytes in one piece, built once for every client of the run, or None
    when they exceed one write (:data:`~.frames.WRITE_SIZE`): a burst goes through the
    clients' queues, written in pieces as each socket drains."""
    if len(frames) == 1:
        return frames[0].wire
    size = 0
    for frame in frames:
        size += len(frame.data)
        if size > WRITE_SIZE:
            return None
    return b"".join(frame.wire for frame in frames)


def _joined(messages: list[list[Frame]]) -> list[list[Frame]]:
    """Messages of consecutive frames joined where each follows the one before."""
    if len(messages) == 1:
        return messages
    joined: list[list[Frame]] = []
    for frames in messages:
        last = joined[-1] if joined else None
        if last is not None and frames[0].seq == last[-1].seq + 1 and not last[-1].is_final:
            last.extend(frames)
        else:
            joined.append(list(frames))
    return joined


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
    """The clients of one run in this process, and the run's newest live frames.

    No task and no queue of its own: the hub's listener hands it each message of the run, and
    the messages received in one step of the event loop go out together right after it
    (:meth:`_fan_out`). A process that keeps up fans each message out on its own; one that
    falls behind finds several waiting at once and writes them to each client in one write,
    without a timer or a threshold deciding which it is.
    """

    __slots__ = ("_loop", "_pending", "live", "recent", "recent_bytes", "run_id", "subscriptions")

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.subscriptions: set[Subscription] = set()
        # The newest live frames, and older ones a client behind still needs (see _trim):
        # such a client catches up from here, not from the backend.
        self.recent: deque[Frame] | None = None  # made with the first live frame
        self.recent_bytes = 0  # event text held in ``recent``
        self.live = False
        self._pending: list[list[Frame]] | None = None  # received, not yet fanned out
        # Kept: asyncio.get_running_loop() makes a getpid system call.
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, subscription: Subscription) -> None:
        self.subscriptions.add(subscription)
        if self.live:
            subscription.resync()  # otherwise going live does it

    def go_live(self) -> None:
        """The backend confirmed the subscription: history and live now meet, so every client
        reconciles from history (events may have been missed before this point)."""
        if self.recent is not None:
            self.recent.clear()
            self.recent_bytes = 0
        self.live = True
        for subscription in self.subscriptions:
            subscription.resync()

    def receive(self, message: str) -> None:
        try:
            frames = frames_from_message(message)
        except ValueError:
            logger.warning("Ignoring a malformed message on run %s", self.run_id)
            return
        metrics.received(len(frames))
        for run in _consecutive(frames):
            self._deliver(_until_final(run))

    def _deliver(self, frames: list[Frame]) -> None:
        recent = self.recent
        if recent is None:
            recent = self.recent = deque()
        elif recent and frames[0].seq != recent[-1].seq + 1:
            recent.clear()  # a gap: the window only ever holds a consecutive range
            self.recent_bytes = 0
        recent.extend(frames)
        self.recent_bytes += sum(len(frame.data) for frame in frames)
        if self._pending is not None:
            self._pending.append(frames)
        else:
            self._pending = [frames]
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._fan_out)

    def _fan_out(self) -> None:
        """The frames received since the last fan-out, to every client: written at once, in
        one write, to each level client (:meth:`Subscription.wrote_now`), else queued.
        ``run_complete`` is always queued: it ends the stream, so the stream's task sends it."""
        messages, self._pending = self._pending or [], None
        for frames in _joined(messages):
            wire = None if frames[-1].is_final else _joined_wire(frames)
            written = 0
            for subscription in self.subscriptions:
                if wire is not None and subscription.wrote_now(frames, wire):
                    written += 1
                else:
                    subscription.offer(frames)
            if written:
                metrics.delivered_live(frames, clients=written)
        # After the clients took them: who fell behind on them decides what is kept.
        if self.recent is not None and len(self.recent) > RECENT_FRAMES:
            self._trim(self.recent)

    def _trim(self, recent: deque[Frame]) -> None:
        """Keep the newest RECENT_FRAMES, and older frames while a client behind needs them
        and they fit in RECENT_MAX_BYTES."""
        keep_from = recent[-1].seq - RECENT_FRAMES + 1
        for subscription in self.subscriptions:
            if subscription.behind_since is not None and subscription.last_seq < keep_from:
                keep_from = subscription.last_seq + 1
        while len(recent) > RECENT_FRAMES and (
            recent[0].seq < keep_from or self.recent_bytes > RECENT_MAX_BYTES
        ):
            self.recent_bytes -= len(recent.popleft().data)


class Hub:
    """Run channels for one server process, fed by one listener over the backend.

    The backend's subscriptions follow ``runs``: a run is subscribed while it has a client.
    One task makes those changes, one at a time and in order, so a run left and joined again
    quickly never ends up unsubscribed, and no client's task is ever inside a backend
    (un)subscribe when it is cancelled. broadcaster's ``Broadcast.subscribe`` is not used on this
    side: its queue and reading task per run took an idle connection on its own run from 24.7 to
    30.9 KB and handshakes from 1,098 to 899/s, for the same fan-out throughput.
    """

    def __init__(
        self, transport: Transport, *, replay_page_size: int = 500, max_lag_seconds: float = 30.0
    ) -> None:
        self.transport = transport
        self.runs: dict[str, RunChannel] = {}
        self.replay_page_size = replay_page_size
        self.history = HistoryPages(transport.backend, replay_page_size)
        self.max_lag_seconds = max_lag_seconds
        self._subscribed: set[str] = set()  # runs the backend was asked to subscribe
        self._changed: asyncio.Queue[str] = asyncio.Queue()  # runs to (un)subscribe
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Connect the backend and start the listener and the subscription keeper."""
        await self.transport.backend.connect()
        self._tasks = [
            asyncio.create_task(self._listen(), name="prefect-ws hub listener"),
            asyncio.create_task(self._keep_subscriptions(), name="prefect-ws hub subscriptions"),
        ]

    async def close(self) -> None:
        for channel in list(self.runs.values()):
            for subscription in channel.subscriptions:
                subscription.abort(closecodes.GOING_AWAY, "server shutting down")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transport.backend.disconnect()

    def attach(self, subscription: Subscription) -> RunChannel:
        """Register a client on its run, subscribing the process to the run if it is the first.

        Pair with :meth:`detach` (``try``/``finally``): plain calls rather than a context
        manager, which would keep a generator alive for as long as the stream."""
        run_id = subscription.run_id
        channel = self.runs.get(run_id)
        if channel is None:
            channel = self.runs[run_id] = RunChannel(run_id)
            if self.transport.backend.is_live(run_id):
                channel.go_live()  # still subscribed (its unsubscribe not yet made) and confirmed
            self._changed.put_nowait(run_id)
        channel.add(subscription)
        return channel

    def detach(self, subscription: Subscription, channel: RunChannel) -> None:
        """The client is gone: unsubscribe the process from the run if it was the last."""
        channel.subscriptions.discard(subscription)
        run_id = subscription.run_id
        if not channel.subscriptions and self.runs.get(run_id) is channel:
            del self.runs[run_id]
            self._changed.put_nowait(run_id)

    async def _listen(self) -> None:
        backend = self.transport.backend
        while True:
            event = await backend.next_published()
            channel = self.runs.get(event.channel)
            if channel is None:
                continue  # a run nobody here watches any more
            try:
                if event.message == RESYNC:
                    channel.go_live()
                else:
                    channel.receive(event.message)
            except Exception:  # one bad message must not stop every stream of the process
                logger.exception("Delivering a message of run %s failed", event.channel)

    async def _keep_subscriptions(self) -> None:
        """Each round makes the changes queued since the last, at once (the backend sends
        concurrent subscribes as one command); a run changes at most once per round."""
        while True:
            changed = {await self._changed.get()}
            while not self._changed.empty():
                changed.add(self._changed.get_nowait())
            await asyncio.gather(*(self._follow(run_id) for run_id in changed))

    async def _follow(self, run_id: str) -> None:
        """(Un)subscribe the run as whether it has clients here now says."""
        backend = self.transport.backend
        try:
            if run_id in self.runs and run_id not in self._subscribed:
                self._subscribed.add(run_id)
                await backend.subscribe(run_id)
            elif run_id not in self.runs and run_id in self._subscribed:
                self._subscribed.discard(run_id)
                await backend.unsubscribe(run_id)
        except Exception:  # the backend resubscribes what it was asked for when it is back
            logger.exception("(Un)subscribing run %s failed", run_id)

    async def catch_up(
        self, subscription: Subscription, *, initial: bool = False
    ) -> AsyncIterator[list[Frame]]:
        """Frames after ``subscription.last_seq``, in pages: from the run's recent frames when
        they reach back far enough, else from the backend's history."""
        channel = self.runs.get(subscription.run_id)
        while not initial and channel is not None and channel.recent:
            recent = channel.recent  # read again after each page: it moves meanwhile
            wanted = subscription.last_seq + 1
            if not recent[0].seq <= wanted <= recent[-1].seq:
                break  # not (or no longer) in memory: the backend's history has it
            start = wanted - recent[0].seq
            batch = _until_final(list(islice(recent, start, start + RECENT_PAGE)))
            yield batch  # the caller advances subscription.last_seq
            if batch[-1].is_final or batch[-1].seq >= recent[-1].seq:
                return
        if not initial and subscription.epoch is not None:
            await self._check_same_history(subscription)
        cursor = subscription.last_seq
        while True:
            frames = await self.history.after(subscription.run_id, subscription.epoch, cursor)
            page = _following(frames, cursor, initial=initial)
            if page:
                cursor = page[-1].seq
                yield page
                initial = False
            if len(frames) < self.replay_page_size or (page and page[-1].is_final):
                if not page and subscription.last_seq > 0:
                    await self._check_history_kept(subscription)
                return

    async def _check_same_history(self, subscription: Subscription) -> None:
        """Before reading on from history: it is still the one the stream started in."""
        info = await self.transport.backend.info(subscription.run_id)
        if info.epoch != subscription.epoch:
            raise StreamClosed(
                closecodes.INTERNAL_ERROR,
                "run history was reset (backend restarted empty); reconnect with since=0",
            )

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


class Batches:
    """Every frame of a run after ``since`` that passes the stream's filter (``select``), once
    each and in order, until ``run_complete``, in batches of consecutive frames (unless
    filtered): as they came from the backend, or a backlog at once.

    An object whose :meth:`next` the stream awaits, rather than an async generator: a stream
    waiting for its run's next event is then one coroutine waiting on a future, with no
    generator frame, no ``asend`` object and no entry in the loop's set of generators, which
    most of a server's connections do most of the time.
    """

    __slots__ = ("_handed", "_hub", "_initial", "_pages", "_select", "subscription")

    def __init__(
        self,
        hub: Hub,
        subscription: Subscription,
        select: Callable[[list[Frame]], list[Frame]],
    ) -> None:
        self._hub = hub
        self.subscription = subscription
        self._select = select
        self._initial = True  # the stream's first read of history
        self._pages: AsyncIterator[list[Frame]] | None = None  # a catch-up under way
        self._handed = False  # a batch went out; the next call means the client took it

    async def next(self) -> list[Frame] | None:
        """The next batch (never empty), or None after ``run_complete``.

        Raises :class:`ClientLagging` when the client cannot be brought level.
        """
        subscription = self.subscription
        max_lag = self._hub.max_lag_seconds
        while True:
            if self._handed:  # the client took the last batch (or the filter left nothing)
                self._handed = False
                subscription.progressed()
                if self._pages is not None and not subscription.finished:
                    subscription.check_lag(max_lag)
            if self._pages is not None:
                page = None if subscription.finished else await anext(self._pages, None)
                if page is not None:
                    subscription.advance(page)
                    metrics.delivered_replay(len(page))
                    self._handed = True
                    if batch := self._select(page):
                        return batch
                    continue
                await self.aclose()
                self._initial = False
                subscription.caught_up()
            if subscription.finished:
                return None
            subscription.check_lag(max_lag)
            while (waiter := subscription.waiter()) is not None:
                await waiter
            item = subscription.take()
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
                    self._handed = True
                    if batch := self._select(item):
                        return batch
                    continue
            # A resync marker, or a gap in live seq: history has everything up to the newest.
            metrics.replay_started()
            self._pages = self._hub.catch_up(subscription, initial=self._initial)

    async def aclose(self) -> None:
        """Stop a catch-up under way (its history read); nothing else is held."""
        pages, self._pages = self._pages, None
        if pages is not None:
            await pages.aclose()  # type: ignore[attr-defined]
