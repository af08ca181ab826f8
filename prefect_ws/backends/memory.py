"""``memory://``: publisher and server in one process, nothing to install.

The store is process-wide and thread-safe because the publisher runs in its own thread (with
its own event loop) while the server runs on uvicorn's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
import weakref
from collections import OrderedDict, deque
from typing import Any

from broadcaster import Event

from prefect_ws.backends.base import RESYNC, PublishResult, RecentRun, RunInfo, StreamBackend
from prefect_ws.protocol.events import Draft, join_frames


class _RunLog:
    __slots__ = ("ended", "epoch", "events", "seq", "updated")

    def __init__(self, maxlen: int) -> None:
        self.epoch = secrets.token_hex(8)  # a run evicted and published again starts another
        self.seq = 0
        self.ended = False  # its run_complete is stored: every later append is refused
        self.updated = 0.0
        self.events: deque[tuple[int, str]] = deque(maxlen=maxlen)


class MemoryStore:
    """Sequence numbers and capped history of the most recent runs, shared by a process."""

    def __init__(self, *, history_maxlen: int, max_runs: int) -> None:
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, _RunLog] = OrderedDict()
        self._history_maxlen = history_maxlen
        self._max_runs = max_runs
        self._backends: weakref.WeakSet[MemoryBackend] = weakref.WeakSet()

    def attach(self, backend: MemoryBackend) -> None:
        with self._lock:
            self._backends.add(backend)

    def detach(self, backend: MemoryBackend) -> None:
        with self._lock:
            self._backends.discard(backend)

    def append(self, run_id: str, drafts: list[Draft], head: int | None = None) -> PublishResult:
        """Store and deliver ``drafts`` up to a ``run_complete``, unless the run has ended (or,
        given ``head``, its newest seq moved past it): the end-once rule, under the lock."""
        with self._lock:
            log = self._runs.get(run_id)
            if log is not None and log.ended:
                return PublishResult(PublishResult.ENDED)
            if head is not None and (log.seq if log is not None else 0) != head:
                return PublishResult(PublishResult.MOVED)
            if log is None:
                log = self._runs[run_id] = _RunLog(self._history_maxlen)
                while len(self._runs) > self._max_runs:
                    self._runs.popitem(last=False)
            else:
                self._runs.move_to_end(run_id)
            log.updated = time.time()
            texts = []
            for draft in drafts:
                log.seq += 1
                text = draft.complete(log.seq)
                log.events.append((log.seq, text))
                texts.append(text)
                if draft.type == "run_complete":
                    log.ended = True  # events after it in the same batch are dropped with it
                    break
            message = join_frames(texts)
            # Delivered under the lock so every subscriber sees one run's messages in seq order.
            for backend in list(self._backends):
                backend._deliver(run_id, message)
            return PublishResult(log.seq)

    def recent_runs(self, limit: int) -> list[RecentRun]:
        """Newest first: ``_runs`` is kept in order of last append."""
        with self._lock:
            logs = list(self._runs.items())[-limit:] if limit > 0 else []
        return [RecentRun(run_id, log.updated, log.seq) for run_id, log in reversed(logs)]

    def info(self, run_id: str) -> RunInfo:
        with self._lock:
            log = self._runs.get(run_id)
            if log is None:
                return RunInfo(head=0, first=None, last=None)
            if not log.events:
                return RunInfo(head=log.seq, first=None, last=None, epoch=log.epoch)
            return RunInfo(
                head=log.seq, first=log.events[0][0], last=log.events[-1][1], epoch=log.epoch
            )

    def history(self, run_id: str, after: int, limit: int) -> list[str]:
        with self._lock:
            log = self._runs.get(run_id)
            if log is None or not log.events:
                return []
            first = log.events[0][0]
            start = max(0, after + 1 - first)
            return [text for _, text in list(log.events)[start : start + limit]]


_stores: dict[str, MemoryStore] = {}
_stores_lock = threading.Lock()


def memory_store(url: str, *, history_maxlen: int, max_runs: int) -> MemoryStore:
    """The store for ``url``: a process's ``memory://`` backends with the same URL share it."""
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = MemoryStore(history_maxlen=history_maxlen, max_runs=max_runs)
        return store


class MemoryBackend(StreamBackend):
    name = "memory"

    def __init__(
        self, url: str = "memory://", *, history_maxlen: int = 110_000, max_runs: int = 1000
    ):
        self._store = memory_store(url, history_maxlen=history_maxlen, max_runs=max_runs)
        self._channels: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._store.attach(self)

    async def disconnect(self) -> None:
        self._store.detach(self)
        self._loop = None

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        self._queue.put_nowait(Event(channel, RESYNC))

    def is_live(self, channel: str) -> bool:
        return channel in self._channels

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def publish(self, channel: str, message: Any) -> None:
        drafts: list[Draft] = message
        if drafts:
            self._store.append(channel, drafts)

    async def next_published(self) -> Event:
        return await self._queue.get()

    async def publish_end(self, run_id: str, drafts: list[Draft], *, head: int) -> PublishResult:
        return self._store.append(run_id, drafts, head)

    async def history(self, run_id: str, after: int, limit: int) -> list[str]:
        return self._store.history(run_id, after, limit)

    async def ping(self) -> None:
        return None

    async def recent_runs(self, limit: int) -> list[RecentRun]:
        return self._store.recent_runs(limit)

    async def info(self, run_id: str) -> RunInfo:
        return self._store.info(run_id)

    def _deliver(self, channel: str, message: str) -> None:
        loop = self._loop
        if loop is None or channel not in self._channels:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us
            loop.call_soon_threadsafe(self._queue.put_nowait, Event(channel, message))
