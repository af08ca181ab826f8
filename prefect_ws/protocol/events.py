"""The event protocol, version 1.

Every event is one JSON object::

    {"v":1,"type":"step_log","runId":"<flow run id>","seq":7,"ts":"...","payload":{...}}

``seq`` is assigned where the event is stored (the backend), not where it is made, so that any
number of publishing processes agree on one order. A publisher therefore encodes an event as a
:class:`Draft`: the JSON text before the ``seq`` value and the JSON text after it. The backend joins
them around the number it assigns, once, and every client of every replica receives those same
bytes, live or replayed.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import orjson

from prefect_ws.protocol.frames import text_frame

PROTOCOL_VERSION: Final = 1

EventType = Literal[
    "run_start", "run_attempt", "step_start", "step_log", "step_complete", "run_complete"
]
EVENT_TYPES: Final[tuple[str, ...]] = (
    "run_start",
    "run_attempt",  # a flow run's retry begins (attempt 2, 3, ...); same stream, same seq
    "step_start",
    "step_log",
    "step_complete",
    "run_complete",
)
STEP_STATUSES: Final[tuple[str, ...]] = ("completed", "failed", "skipped", "cancelled", "crashed")
# Steps that count as failed in run_complete's failedSteps.
FAILED_STATUSES: Final[tuple[str, ...]] = ("failed", "crashed")
RUN_STATUSES: Final[tuple[str, ...]] = ("completed", "failed", "cancelled", "crashed")


def _dumps(value: Any) -> str:
    """Compact JSON of user data (parameters, log messages): anything not JSON-native is shown
    as text rather than breaking the stream.

    orjson where it can (a step_log's payload 3.65 -> 0.29 us; docs/benchmarks.md section 6);
    the standard library for what orjson refuses: integers over 64 bits, and lone surrogates,
    which it escapes (ASCII output) so that the event can still be sent as UTF-8.
    """
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, separators=(",", ":"), default=str)


_RUN_ID: Final = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII | re.IGNORECASE
)


def canonical_run_id(raw: str) -> str | None:
    """A run id is a Prefect flow run UUID: its lower-case form, or None for anything else.

    Only the 8-4-4-4-12 hexadecimal spelling (either case) is one: ``uuid.UUID`` also reads
    braces, ``urn:uuid:``, missing hyphens and non-ASCII digits, and every such alias of a run
    would slip past a proxy rule written for its path. Every entry point (stream, pages, checks,
    tokens, ``tail``) uses this one check.
    """
    # Interned: one string per run, however many streams, channels and sets hold its id.
    return sys.intern(raw.lower()) if _RUN_ID.fullmatch(raw) else None


_second: tuple[int, str] = (0, "1970-01-01T00:00:00")  # the last whole second formatted


def utc_timestamp(epoch: float | None = None) -> str:
    """An ISO 8601 UTC timestamp with microseconds, e.g. ``2026-11-29T00:31:02.123456Z``.

    Every event carries one: the date and time are formatted once per second (3.2 -> ~0.5 us).
    """
    global _second
    moment = time.time() if epoch is None else epoch
    whole = math.floor(moment)
    second, text = _second
    if whole != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return f"{text}.{int((moment - whole) * 1_000_000):06d}Z"


@dataclass(frozen=True, slots=True)
class Draft:
    """An encoded event waiting for its ``seq``: ``head + str(seq) + tail`` is the final JSON."""

    run_id: str
    type: str
    head: str
    tail: str

    def complete(self, seq: int) -> str:
        return f"{self.head}{seq}{self.tail}"


def encode(run_id: str, type: str, payload: dict[str, Any], ts: float | None = None) -> Draft:
    """Encode an event once; the backend only inserts the sequence number."""
    head = f'{{"v":{PROTOCOL_VERSION},"type":"{type}","runId":{_dumps(run_id)},"seq":'
    tail = f',"ts":"{utc_timestamp(ts)}","payload":{_dumps(payload)}}}'
    return Draft(run_id=run_id, type=type, head=head, tail=tail)


_SEQ_MARK: Final = ',"seq":'
_TS_MARK: Final = ',"ts":"'
_FINAL_MARK: Final = f'{{"v":{PROTOCOL_VERSION},"type":"run_complete"'


class Frame:
    """One stored event as it travels to clients: its text, its ``seq`` and its wire bytes."""

    __slots__ = ("_wire", "data", "seq")

    def __init__(self, seq: int, data: str, *, shared: bool = False) -> None:
        self.seq = seq
        self.data = data
        self._wire = text_frame(data.encode()) if shared else None

    def __repr__(self) -> str:
        return f"Frame(seq={self.seq}, data={self.data!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and (self.seq, self.data) == (other.seq, other.data)

    def __hash__(self) -> int:
        return hash((self.seq, self.data))

    @property
    def wire(self) -> bytes:
        """The event as a WebSocket text frame (:mod:`.frames`): built once for a frame
        made ``shared`` (a live frame, sent to every client of the run), else on each use (a
        frame read from history goes to one client; keeping its bytes would double its size)."""
        return self._wire if self._wire is not None else text_frame(self.data.encode())

    @property
    def is_final(self) -> bool:
        """True for ``run_complete``, always the last event of a run."""
        return self.data.startswith(_FINAL_MARK)

    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.data)
        return parsed


def frame_from_text(data: str, *, shared: bool = False) -> Frame:
    """Read ``seq`` without parsing the JSON: every event is written by :func:`encode`."""
    start = data.index(_SEQ_MARK) + len(_SEQ_MARK)
    end = data.index(",", start)
    return Frame(int(data[start:end]), data, shared=shared)


def frames_from_message(message: str) -> list[Frame]:
    """A live backend message carries one or more events, one per line (JSON text has no raw
    newline); its frames go to every client of the run, so their wire bytes are built now."""
    return [frame_from_text(line, shared=True) for line in message.split("\n") if line]


def join_frames(texts: list[str]) -> str:
    return "\n".join(texts)


def event_age(data: str) -> float | None:
    """Seconds since the event's ``ts`` (the publisher's clock), or None without one."""
    start = data.find(_TS_MARK)
    if start < 0:
        return None
    start += len(_TS_MARK)
    try:
        moment = datetime.fromisoformat(data[start : data.index('"', start)])
    except ValueError:
        return None
    return max(0.0, time.time() - moment.timestamp())
