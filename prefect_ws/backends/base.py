"""What prefect-ws needs from a transport, beyond broadcaster's publish/subscribe.

A backend is a :class:`broadcaster.BroadcastBackend` whose channels are run ids. ``publish`` takes
a list of :class:`Draft` (one run's events, in order), assigns each its ``seq``
atomically, stores it in the run's capped history and publishes the finished events as one
message, one event per line. Subscribers receive those lines, plus an empty message
(:data:`RESYNC`) each time the backend (re)subscribes to a channel: events may have been missed
before that point, so the hub reconciles its clients from history.

:class:`StreamBackend` is an ABC: a backend that leaves out a method cannot be instantiated.
A backend that cannot reach its store raises :class:`BackendUnavailable`, the one error server
code catches (its own client library's error types stay inside the backend).

A run ends once: the batch holding its ``run_complete`` marks it ended in the same atomic step
that stores it, and every later batch of the run is refused. So the flow's own hooks and any
number of server replicas that end a run Prefect reports finished never give it two ends.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from broadcaster import BroadcastBackend, Event

from prefect_ws.protocol.events import Draft

RESYNC: Final = ""


class BackendUnavailable(Exception):
    """The backend's store did not answer (down, restarting, out of connections): retry later."""


class StreamBackend(BroadcastBackend, ABC):
    """A broadcaster backend with ordered, per-run history."""

    name: str = "backend"

    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def disconnect(self) -> None: ...

    @abstractmethod
    async def subscribe(self, channel: str) -> None: ...

    @abstractmethod
    async def unsubscribe(self, channel: str) -> None: ...

    @abstractmethod
    async def publish(self, channel: str, message: Any) -> None:
        """Store and publish one run's drafts (``message``: a list of :class:`Draft`)."""

    @abstractmethod
    async def next_published(self) -> Event: ...

    @abstractmethod
    async def publish_end(self, run_id: str, drafts: list[Draft], *, head: int) -> PublishResult:
        """Store ``drafts`` (ending with ``run_complete``) only if the run has not ended and its
        newest ``seq`` is still ``head``, in one atomic step.

        The caller computed ``drafts`` from the history up to ``head`` (the steps still open);
        when the head moved it reads again and retries, when the run ended it stops.
        """

    @abstractmethod
    async def history(self, run_id: str, after: int, limit: int) -> list[str]:
        """Up to ``limit`` stored events of the run with ``seq > after``, in ``seq`` order."""

    @abstractmethod
    async def info(self, run_id: str) -> RunInfo:
        """Where the run's stored history stands (all zeros/None for a run never seen)."""

    def is_live(self, channel: str) -> bool:
        """True once the backend is subscribed to ``channel`` and delivering it.

        The hub asks right after subscribing: the backend's RESYNC for a subscription confirmed
        while broadcaster was still registering the subscriber's queue is dropped by broadcaster.
        """
        return False

    @abstractmethod
    async def ping(self) -> None:
        """Return if the backend answers; raise otherwise."""

    async def recent_runs(self, limit: int) -> list[RecentRun]:
        """The runs that published most recently, newest first (for the index page).

        Not abstract so that a backend without a run index still serves streams.
        """
        return []


class PublishResult(int):
    """What :meth:`StreamBackend.publish_end` did: the run's newest ``seq`` once stored, else
    :attr:`ENDED` (the run had ended: nothing was stored) or :attr:`MOVED` (events were added
    after ``head``: nothing was stored)."""

    ENDED: Final = -1
    MOVED: Final = -2

    @property
    def stored(self) -> bool:
        return self >= 0

    @property
    def ended(self) -> bool:
        return self == self.ENDED

    @property
    def moved(self) -> bool:
        return self == self.MOVED


class Batch(list[Draft]):
    """Drafts published together. ``key`` = (publisher id, batch number, increasing per
    publisher) lets a backend store a batch once when the publisher retries it after losing
    the reply (the script ran, the connection died). Plain lists are published as they come."""

    key: tuple[str, int] | None = None


class BatchSink(ABC):
    """A backend's publishing half, for a flow process's publisher thread: blocking calls.

    That thread sends one run's batch at a time, in order, and waits for each to be stored, so
    a sink is called from one thread only. ``publish`` raises on any failure; the caller keeps
    the batch and sends it again (its ``key`` makes the retry a no-op where the first try was
    stored).
    """

    @abstractmethod
    def publish(self, run_id: str, batch: Batch) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class LoopSink(BatchSink):
    """Any :class:`StreamBackend` driven from a private event loop, connected on first use."""

    def __init__(self, backend: StreamBackend) -> None:
        self._backend = backend
        self._runner = asyncio.Runner()
        self._connected = False

    def publish(self, run_id: str, batch: Batch) -> None:
        if not self._connected:
            self._runner.run(self._backend.connect())
            self._connected = True
        self._runner.run(self._backend.publish(run_id, batch))

    def close(self) -> None:
        try:
            if self._connected:
                self._runner.run(self._backend.disconnect())
        finally:
            self._runner.close()


@dataclass(frozen=True, slots=True)
class RecentRun:
    """A run in the recent-runs index: when it last published and its newest ``seq``."""

    run_id: str
    updated: float  # epoch seconds of its last published batch
    head_seq: int


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run's stored history: newest ``seq`` issued, oldest retained, and the newest event."""

    head: int  # 0: no event was ever stored (or the run's keys expired)
    first: int | None  # oldest seq still retained; None when nothing is retained
    last: str | None  # the newest retained event's text
    # Made when the run's seq counter is created: a history lost and begun again (a store that
    # came back empty) has another epoch, so a client's ``since`` from before is recognisably
    # about other events. None for a run never seen.
    epoch: str | None = None

    @property
    def known(self) -> bool:
        return self.head > 0

    def missing_after(self, since: int) -> bool:
        """True when events after ``since`` were issued but are no longer retained."""
        if self.head <= since:
            return False
        return self.first is None or self.first > since + 1


REDACTED: Final = "[redacted]"


def safe_url(url: str) -> str:
    """``url`` without its user and password (a backend URL, for a log line or an answer):
    here, not with the server's redaction, so that a flow process imports no server code."""
    parts = urlsplit(url)
    _, at, hosts = parts.netloc.rpartition("@")
    if not at:
        return url
    # The hosts as written: a cluster URL names several (``a:7000,b:7001``), which urlsplit
    # cannot read as one host and port.
    return parts._replace(netloc=f"{REDACTED}@{hosts}").geturl()
