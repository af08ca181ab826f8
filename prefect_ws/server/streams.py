"""What a client asked for, and the stream that answers it: shared by WebSocket, SSE and HTTP.

A stream starts with a ``hello`` control frame (no ``seq``) telling the client where it joined,
then carries every event after ``since`` that passes its filters, exactly once and in ``seq``
order, and ends after ``run_complete``. ``seq`` stays the run's sequence under filters, so a
client resumes with ``since=<last seq it saw>`` whatever it filtered.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from prefect_ws.backends import RunInfo
from prefect_ws.protocol import closecodes
from prefect_ws.protocol.events import EVENT_TYPES, Frame, canonical_run_id, frame_from_text
from prefect_ws.server.hub import Batches, Hub, RunChannel, StreamClosed, Subscription

if TYPE_CHECKING:
    from prefect_ws.server.reconcile import Reconciler

MAX_SINCE: Final = 2**53  # JSON-safe; larger is certainly not a seq we issued
MAX_STEP_FILTERS: Final = 100
LEVELS: Final = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_RUN_EVENTS: Final = frozenset({"run_start", "run_complete"})
_DIGITS: Final = re.compile(r"[0-9]{1,20}", re.ASCII)
_SECONDS: Final = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?", re.ASCII)
_EPOCH: Final = re.compile(r"[0-9A-Za-z._-]{1,64}", re.ASCII)


class InvalidRequest(ValueError):
    """A client request that cannot be served as asked; the message says why."""


def parse_run_id(raw: str) -> str:
    """The canonical form of a run id (a Prefect flow run UUID), or :class:`InvalidRequest`."""
    run_id = canonical_run_id(raw)
    if run_id is None:
        raise InvalidRequest("invalid run id: expected a flow run UUID")
    return run_id


def ascii_integer(raw: str) -> int | None:
    """``raw`` as a non-negative integer when it is 1 to 20 ASCII digits, else None.

    ``str.isdigit`` and ``int`` also take superscripts, circled, Arabic-Indic and fullwidth
    digits (and ``int`` underscores and spaces): every number on the wire is parsed here.
    """
    return int(raw) if _DIGITS.fullmatch(raw) else None


def parse_seq(raw: str | None, name: str = "since") -> int:
    if raw is None or raw == "":
        return 0
    value = ascii_integer(raw)
    if value is None:
        raise InvalidRequest(f"invalid {name}: expected a non-negative integer seq")
    if value > MAX_SINCE:
        raise InvalidRequest(f"invalid {name}: larger than any seq")
    return value


def parse_wait(raw: str | None, max_wait: float) -> float | None:
    """``wait=<seconds>`` or ``wait=true`` (the server's maximum): wait for a run to start."""
    if raw is None or raw in ("", "0", "false"):
        return None
    if raw == "true":
        return max_wait
    if not _SECONDS.fullmatch(raw):
        raise InvalidRequest("invalid wait: expected seconds or true")
    return min(float(raw), max_wait)


def parse_epoch(raw: str | None) -> str | None:
    """``epoch=<the hello's epoch>``: the history the client's ``since`` counts in."""
    if raw is None or raw == "":
        return None
    if not _EPOCH.fullmatch(raw):
        raise InvalidRequest("invalid epoch: expected the epoch of a hello frame")
    return raw


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Server-side filters: event types, steps (run-level events always pass), minimum log level."""

    types: frozenset[str] | None = None
    steps: frozenset[str] | None = None
    min_level: int | None = None

    @property
    def everything(self) -> bool:
        return self.types is None and self.steps is None and self.min_level is None

    @classmethod
    def parse(cls, types: str | None, steps: Sequence[str], level: str | None) -> EventFilter:
        type_set = None
        if types is not None:
            names = [t.strip() for t in types.split(",") if t.strip()]
            unknown = sorted(set(names) - set(EVENT_TYPES))
            if not names or unknown:
                raise InvalidRequest(
                    f"invalid types: {', '.join(unknown)[:100] or '(empty)'}; "
                    f"expected a comma-separated subset of {','.join(EVENT_TYPES)}"
                )
            type_set = frozenset(names)
        step_set = None
        if steps:
            if len(steps) > MAX_STEP_FILTERS or any(not s or len(s) > 200 for s in steps):
                raise InvalidRequest(f"invalid step: 1 to {MAX_STEP_FILTERS} non-empty step ids")
            step_set = frozenset(steps)
        min_level = None
        if level is not None:
            min_level = LEVELS.get(level.upper())
            if min_level is None:
                raise InvalidRequest(f"invalid level: expected one of {', '.join(LEVELS)}")
        return cls(type_set, step_set, min_level)

    def select(self, frames: list[Frame]) -> list[Frame]:
        """The frames that pass, as the same list when nothing is filtered."""
        return frames if self.everything else [frame for frame in frames if self.matches(frame)]

    def matches(self, frame: Frame) -> bool:
        if self.everything:
            return True
        event = frame.event()
        kind = event.get("type")
        if self.types is not None and kind not in self.types:
            return False
        payload = event.get("payload") or {}
        if (
            self.steps is not None
            and kind not in _RUN_EVENTS
            and payload.get("stepId") not in self.steps
        ):
            return False
        if self.min_level is not None and kind == "step_log":
            return LEVELS.get(str(payload.get("level")), 0) >= self.min_level
        return True


@dataclass(frozen=True, slots=True)
class StreamRequest:
    run_id: str
    since: int
    filter: EventFilter
    wait: float | None
    epoch: str | None = None  # the history ``since`` counts in (the client's last hello)

    def subscription(self, queue_size: int) -> Subscription:
        return Subscription(self.run_id, since=self.since, queue_size=queue_size)

    @classmethod
    def parse(
        cls,
        run_id: str,
        query: Mapping[str, str],
        steps: Sequence[str],
        *,
        max_wait: float,
        last_event_id: str | None = None,
    ) -> StreamRequest:
        since = parse_seq(query.get("since"))
        if last_event_id:  # SSE resume: the browser sends the last id it saw
            since = max(since, parse_seq(last_event_id, "Last-Event-ID"))
        return cls(
            run_id=parse_run_id(run_id),
            since=since,
            filter=EventFilter.parse(query.get("types"), steps, query.get("level")),
            wait=parse_wait(query.get("wait"), max_wait),
            epoch=parse_epoch(query.get("epoch")),
        )


def unknown_run() -> StreamClosed:
    return StreamClosed(
        closecodes.UNKNOWN_RUN,
        "unknown run: no events for this run id (add wait=<seconds> to wait for it to start)",
    )


def since_beyond_head(head: int) -> StreamClosed:
    return StreamClosed(
        closecodes.INVALID_REQUEST,
        f"invalid since: beyond the run's newest seq {head}; resume with the last seq received",
    )


def hello(
    request: StreamRequest, info: RunInfo, since: int, reset: bool, waiting: str | None = None
) -> str:
    """The control frame that opens every stream. ``waiting``: the Prefect state (``Scheduled``,
    ``Pending``, ``Late``, ``Paused``...) of a run Prefect knows but that has not published yet."""
    fields: dict[str, object] = {
        "type": "hello",
        "v": 1,
        "runId": request.run_id,
        "since": since,
        "head": info.head,
        "first": info.first,
        "recovered": not reset and not info.missing_after(since),
        "epoch": info.epoch,
        "reset": reset,
    }
    if waiting is not None:
        fields["waiting"] = waiting
    return json.dumps(fields, separators=(",", ":"))


def history_reset(info: RunInfo, epoch: str | None) -> bool:
    """The client's ``since`` counts in another history than the run's current one."""
    return epoch is not None and epoch != info.epoch


class Stream:
    """One client's stream of a run: :meth:`hello` first, then :meth:`next` until it returns
    None; :meth:`aclose` always, whatever ended it.

    A run with no events yet is looked up in Prefect (``prefect``): one Prefect has not started
    is waited for as if the client had asked ``wait=``; one Prefect recorded as finished is
    ended from that record now; one Prefect does not know is unknown (4404).

    :meth:`next` raises :class:`StreamClosed` when the stream must end otherwise than after
    ``run_complete`` (unknown run, lagging client, shutdown, or ``subscription.abort``). An
    object rather than an async generator, for the reason :class:`~.hub.Batches` gives.
    """

    __slots__ = ("_batches", "_channel", "_deadline", "hub", "prefect", "request", "subscription")

    def __init__(
        self,
        hub: Hub,
        request: StreamRequest,
        subscription: Subscription,
        prefect: Reconciler | None = None,
    ) -> None:
        self.hub = hub
        self.request = request
        self.subscription = subscription
        self.prefect = prefect
        self._channel: RunChannel | None = None
        self._batches: Batches | None = None  # made by hello()
        self._deadline: asyncio.TimerHandle | None = None  # for a run that has not started

    async def hello(self) -> str:
        """Join the run: the text of the ``hello`` control frame that opens the stream."""
        hub, request, prefect = self.hub, self.request, self.prefect
        subscription = self.subscription
        self._channel = hub.attach(subscription)
        backend = hub.transport.backend
        info = await backend.info(request.run_id)
        wait = request.wait
        waiting: str | None = None
        if not info.known and prefect is not None:
            state = await prefect.lookup(request.run_id)
            if state is not None and state.final:
                await prefect.end(request.run_id, state)
                info = await backend.info(request.run_id)
            elif state is not None:
                waiting = state.name
                wait = max(wait or 0.0, prefect.max_wait)
        if not info.known and wait is None:
            raise unknown_run()
        since = request.since
        reset = history_reset(info, request.epoch)
        if reset:  # the history was lost and begun again: its events from the start
            since = subscription.last_seq = 0
        if since > info.head:
            # No client can have seen it; waiting would skip every event, run_complete too.
            raise since_beyond_head(info.head)
        subscription.epoch = info.epoch
        if info.last is not None and since >= info.head and frame_from_text(info.last).is_final:
            subscription.finished = True  # a finished run the client has whole: nothing to send
        self._batches = Batches(hub, subscription, request.filter.select)
        if not info.known:
            assert wait is not None
            self._deadline = asyncio.get_running_loop().call_later(
                wait, _not_started, subscription, wait, context=_NO_CONTEXT
            )
        return hello(request, info, since, reset, waiting)

    def next(self) -> Coroutine[Any, Any, list[Frame] | None]:
        """The next batch of frames that passed the filters (never empty; consecutive ``seq``
        unless filtered), or None once the stream is over. (The batches' own coroutine: a
        waiting stream keeps no frame of this object's.)"""
        assert self._batches is not None, "hello() first"
        return self._batches.next()

    async def aclose(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self._batches is not None:
            await self._batches.aclose()
        if self._channel is not None:
            self.hub.detach(self.subscription, self._channel)
            self._channel = None


_NO_CONTEXT: Final = contextvars.Context()  # what _not_started runs in: not a copy per stream


def _not_started(subscription: Subscription, wait: float) -> None:
    """A run waited for (``wait=``) that delivered nothing within ``wait`` seconds: 4404.
    Events written straight to a level client count: the run started."""
    if subscription.sent == 0:
        subscription.abort(closecodes.UNKNOWN_RUN, f"run did not start within {wait:g} s")
