"""The publishing side's engine room: hand events to a background thread, never block the flow.

Hooks and the log handler call :meth:`Publisher.emit`, which appends a tuple to a deque and
returns (a few microseconds). One daemon thread per process encodes events, batches them per
run and publishes each batch through the backend's blocking sink (:func:`create_sink`), in the
order they were emitted: it has one thing to wait for at a time, so it needs no event loop.
When the backend is unreachable the flow carries on: the thread retries with backoff, the
buffer of log events is bounded, and what had to be dropped is reported once the backend is
back and at exit.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Any

from prefect_ws.backends import BatchSink, create_sink
from prefect_ws.backends.base import Batch, safe_url
from prefect_ws.protocol.events import Draft, encode
from prefect_ws.settings import Settings, get_settings

logger = logging.getLogger("prefect_ws.publisher")

_Item = tuple[str, str, dict[str, Any], float]
_NEVER_DROPPED = frozenset({"run_start", "step_start", "step_complete", "run_complete"})
_FINISHED_RUNS_KEPT = 10_000
# Events arriving faster than this (per second) make the publisher coalesce: it lets the next
# batch gather for _COALESCE_SECONDS instead of making a round trip per handful of events.
_BUSY_EVENTS_PER_SECOND = 250
_COALESCE_SECONDS = 0.05


class _FlushMarker:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class Publisher:
    """One per process (see :func:`get_publisher`); safe to call from any thread."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._pending: deque[_Item | _FlushMarker] = deque()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._wake = threading.Event()  # set to end the thread's wait: new events, flush, stop
        self._idle = False
        self._stopping = False
        self._finished: OrderedDict[str, None] = OrderedDict()
        self.outage = False
        self._id = uuid.uuid4().hex  # with a batch number, makes a retried batch a no-op
        self._batches = itertools.count(1)
        self.published = 0
        self.dropped = 0  # log events refused while the buffer was full
        self.dropped_late = 0  # events of a run after its run_complete
        self.abandoned = 0  # events still unsent when the publisher was closed

    # -- any thread ------------------------------------------------------------------------
    def emit(
        self, run_id: str, type: str, payload: dict[str, Any], ts: float | None = None
    ) -> None:
        """Queue one event. Never blocks, never raises."""
        if self._thread is None:
            self._start()
        pending = self._pending
        if len(pending) >= self.settings.publisher_buffer_size and type not in _NEVER_DROPPED:
            self.dropped += 1
            return
        pending.append((run_id, type, payload, time.time() if ts is None else ts))
        if self._idle:
            self._wakeup()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event emitted so far is published; False on timeout or outage."""
        if self._thread is None or not self._thread.is_alive():
            return not self._pending
        if self.outage:
            return False
        marker = _FlushMarker()
        self._pending.append(marker)
        self._wakeup()
        wait = self.settings.flush_timeout_seconds if timeout is None else timeout
        return marker.done.wait(wait)

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the thread. Reports what could not be sent."""
        thread = self._thread
        if thread is None:
            return
        self.flush(timeout)
        self._stopping = True
        self._wakeup()
        thread.join(timeout=2.0)
        unsent = self.abandoned + sum(
            1 for item in self._pending if not isinstance(item, _FlushMarker)
        )
        if unsent or self.dropped:
            logger.warning(
                "prefect-ws: %d event(s) not published (%d unsent at exit, %d dropped while "
                "the backend at %s was unreachable)",
                unsent + self.dropped,
                unsent,
                self.dropped,
                safe_url(self.settings.broadcast_url),
            )
        self._thread = None

    def _start(self) -> None:
        with self._thread_lock:
            if self._thread is not None:
                return
            self._stopping = False
            thread = threading.Thread(target=self._run, name="prefect-ws-publisher", daemon=True)
            thread.start()
            self._thread = thread

    def _wakeup(self) -> None:
        self._idle = False
        self._wake.set()

    def _forget_after_fork(self) -> None:
        self._id = uuid.uuid4().hex  # a child must not reuse its parent's batch keys
        self._batches = itertools.count(1)
        self._thread = None
        self._wake = threading.Event()
        self._idle = False
        self._pending.clear()

    # -- publisher thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            sink = create_sink(self.settings)
        except Exception:  # pragma: no cover - a bug here must not reach the flow
            logger.exception("prefect-ws publisher could not start")
            return
        try:
            self._publish_until_stopped(sink)
        except Exception:  # pragma: no cover - a bug here must not reach the flow
            logger.exception("prefect-ws publisher thread failed")
        finally:
            sink.close()

    def _publish_until_stopped(self, sink: BatchSink) -> None:
        wake = self._wake
        busy, last_drain = False, time.monotonic()
        while True:
            if busy:
                self._coalesce()
            batch = self._drain()
            if batch:
                now = time.monotonic()
                busy = (
                    1 < len(batch) < self.settings.publisher_batch_size
                    and len(batch) > (now - last_drain) * _BUSY_EVENTS_PER_SECOND
                )
                last_drain = now
                self._send(sink, batch)
                continue
            busy = False
            if self._stopping:
                return
            self._idle = True
            if not self._pending and not self._stopping:
                wake.wait()
            wake.clear()
            self._idle = False

    def _coalesce(self) -> None:
        """Let events gather for ``_COALESCE_SECONDS`` before the next round trip.

        A round trip costs the flow's process ~100 us of CPU alone and 350-450 us while the
        flow's threads contend for the GIL, whatever its size. A 20-wide DAG that logs makes
        events come faster than round trips: without this it paid one round trip per 3-4
        events, with 10 ms windows ~180 round trips per 200 steps (two thirds of what
        streaming cost it), with 50 ms ~60 (docs/benchmarks.md, section 2). Only while events
        come faster than ``_BUSY_EVENTS_PER_SECOND`` (the DAG's 600-900 events/s kept flipping
        around a 1,000/s threshold): at 100 lines/s each line still goes at once, and only a
        flow logging faster than anyone reads line by line sees its lines up to 50 ms later.
        A flush or a stop ends the wait (both set the wake event; emits do not while we are
        not idle).
        """
        self._wake.clear()
        if self._stopping or (self._pending and isinstance(self._pending[-1], _FlushMarker)):
            return
        self._wake.wait(_COALESCE_SECONDS)

    def _drain(self) -> list[_Item | _FlushMarker]:
        pending, size = self._pending, self.settings.publisher_batch_size
        batch: list[_Item | _FlushMarker] = []
        while pending and len(batch) < size:
            batch.append(pending.popleft())
        return batch

    def _send(self, sink: BatchSink, batch: list[_Item | _FlushMarker]) -> None:
        groups: OrderedDict[str, list[Draft]] = OrderedDict()
        for item in batch:
            if isinstance(item, _FlushMarker):
                self._publish_groups(sink, groups)
                groups.clear()
                item.done.set()
                continue
            run_id, type, payload, ts = item
            if run_id in self._finished:
                if type != "run_start":
                    self.dropped_late += 1
                    continue
                del self._finished[run_id]
            groups.setdefault(run_id, []).append(encode(run_id, type, payload, ts))
            if type == "run_complete":
                self._finished[run_id] = None
                if len(self._finished) > _FINISHED_RUNS_KEPT:
                    self._finished.popitem(last=False)
        self._publish_groups(sink, groups)

    def _publish_groups(self, sink: BatchSink, groups: dict[str, list[Draft]]) -> None:
        for run_id, drafts in groups.items():
            self._publish_with_retry(sink, run_id, drafts)

    def _publish_with_retry(self, sink: BatchSink, run_id: str, drafts: list[Draft]) -> None:
        delay = 0.05
        batch = Batch(drafts)
        batch.key = (self._id, next(self._batches))  # the same key on every retry
        while True:
            try:
                sink.publish(run_id, batch)
            except Exception as exc:
                if not self.outage:
                    self.outage = True
                    logger.warning(
                        "prefect-ws: cannot publish to %s (%s); flows keep running, events are "
                        "buffered (up to %d log events) and retried",
                        safe_url(self.settings.broadcast_url),
                        exc,
                        self.settings.publisher_buffer_size,
                    )
                if self._stopping:
                    self.abandoned += len(drafts)
                    return
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.published += len(drafts)
            if self.outage:
                self.outage = False
                logger.warning(
                    "prefect-ws: publishing to %s again; %d log event(s) were dropped meanwhile",
                    safe_url(self.settings.broadcast_url),
                    self.dropped,
                )
            return


_publisher: Publisher | None = None
_publisher_lock = threading.Lock()


def get_publisher() -> Publisher:
    """The process-wide publisher, created on first use."""
    global _publisher
    publisher = _publisher
    if publisher is None:
        with _publisher_lock:
            if _publisher is None:
                _publisher = Publisher()
            publisher = _publisher
    return publisher


def reset_publisher() -> None:
    """Close the process-wide publisher (settings are read again on next use). For tests."""
    global _publisher
    with _publisher_lock:
        publisher, _publisher = _publisher, None
    if publisher is not None:
        publisher.close()
    get_settings.cache_clear()


def _close_at_exit() -> None:
    if _publisher is not None:
        _publisher.close()


def _after_fork_in_child() -> None:
    if _publisher is not None:
        _publisher._forget_after_fork()


atexit.register(_close_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
