"""Reconciliation: every stream ends the way Prefect says its run ended.

The flow process's hooks are the fast path; they cannot speak when the process is killed, when a
run is cancelled or crashes while no process runs it, or when the flow carries no hooks. So each
server process asks Prefect's API (:mod:`.prefect_api`) about the runs it streams: every
``interval`` seconds, one ``read_flow_runs`` for all of its watched runs that have not ended. A
run Prefect records in a final state (Completed, Failed, Crashed, Cancelled) is left to its own
hooks while its history keeps growing (Prefect records the state just before the process runs
its hooks, and a busy publisher may still be sending a backlog of logs); once it has been final
and quiet for ``grace`` seconds the server ends it: ``step_complete`` for every step still open
(``cancelled`` for a cancelled run, else ``crashed``) and ``run_complete`` with Prefect's status.

Polling rather than Prefect's ``/api/events/out`` stream: a poll cannot miss a state across a
reconnect, needs no server-side event services, and costs one request per interval per server
process, only while it streams runs that have not ended.

The backend decides who ends a run (:meth:`~prefect_ws.backends.base.StreamBackend.publish_end`):
the end is stored only at the history head it was computed from and never after another end,
so the flow's hooks and any number of replicas give each run exactly one ``run_complete``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from typing import Any, Final

from prefect_ws.backends import StreamBackend
from prefect_ws.protocol.events import (
    FAILED_STATUSES,
    STEP_STATUSES,
    Draft,
    encode,
    frame_from_text,
)
from prefect_ws.server.prefect_api import PrefectRuns, PrefectUnavailable, RunState, describe

logger = logging.getLogger("prefect_ws.reconcile")

END_ATTEMPTS: Final = 5  # reads of the history before giving up a run whose head keeps moving
HISTORY_PAGE: Final = 1000
QUIET_TOLERANCE: Final = 0.05  # seconds: a poll that wakes a hair early still counts as on time


async def _open_steps(
    backend: StreamBackend, run_id: str, head: int
) -> tuple[dict[str, str | None], dict[str, int], list[str]]:
    """From the run's history up to ``head``: open steps (step id -> task run id), finished
    step counts and the ids of failed steps."""
    opened: dict[str, str | None] = {}
    counts = dict.fromkeys(STEP_STATUSES, 0)
    failed: list[str] = []
    cursor = 0
    while cursor < head:
        texts = await backend.history(run_id, cursor, HISTORY_PAGE)
        if not texts:
            break
        for text in texts:
            frame = frame_from_text(text)
            if frame.seq > head:
                return opened, counts, failed
            cursor = frame.seq
            if '"type":"step_' not in text[:40] or '"type":"step_log"' in text[:40]:
                continue
            event = frame.event()
            payload = event.get("payload") or {}
            step = payload.get("stepId")
            if not isinstance(step, str):
                continue
            if event["type"] == "step_start":
                opened[step] = payload.get("taskRunId")
            elif event["type"] == "step_complete":
                opened.pop(step, None)
                status = payload.get("status")
                if status in counts:
                    counts[status] += 1
                if status in FAILED_STATUSES:
                    failed.append(step)
    return opened, counts, failed


def end_drafts(
    run_id: str,
    state: RunState,
    opened: dict[str, str | None],
    counts: dict[str, int],
    failed: list[str],
) -> list[Draft]:
    """The events that end a run as Prefect recorded it: open steps, then ``run_complete``."""
    step_status = "cancelled" if state.run_status == "cancelled" else "crashed"
    drafts = [
        encode(
            run_id,
            "step_complete",
            {
                "stepId": step,
                "taskRunId": task_run_id,
                "status": step_status,
                "duration": None,
                "error": state.message if step_status == "crashed" else None,
            },
        )
        for step, task_run_id in opened.items()
    ]
    counts = dict(counts)
    counts[step_status] += len(opened)
    if step_status in FAILED_STATUSES:
        failed = [*failed, *opened]
    status = state.run_status
    drafts.append(
        encode(
            run_id,
            "run_complete",
            {
                "status": status,
                "duration": state.duration,
                "steps": counts,
                "failedSteps": failed,
                "error": (state.message or state.name) if status in ("failed", "crashed") else None,
                "reconciled": True,
            },
        )
    )
    return drafts


async def end_run(backend: StreamBackend, run_id: str, state: RunState) -> bool:
    """End the run's stream as ``state`` says, unless it has ended; True if this call did."""
    for _ in range(END_ATTEMPTS):
        info = await backend.info(run_id)
        if info.last is not None and frame_from_text(info.last).is_final:
            return False
        opened, counts, failed = await _open_steps(backend, run_id, info.head)
        result = await backend.publish_end(
            run_id, end_drafts(run_id, state, opened, counts, failed), head=info.head
        )
        if result.stored:
            return True
        if result.ended:
            return False
    logger.warning("run %s kept publishing; its end is left to the next check", run_id)
    return False


class Reconciler:
    """Ends the streams of the runs this process watches once Prefect records them final.

    ``watched`` returns the run ids that have clients here. ``prefect`` is None until connected
    (and stays None without ``PREFECT_API_URL``): then nothing is reconciled and streams work as
    they would without Prefect.
    """

    def __init__(
        self,
        backend: StreamBackend,
        watched: Callable[[], Collection[str]],
        *,
        interval: float,
        grace: float,
        timeout: float,
        max_wait: float = 3600.0,
    ) -> None:
        self.backend = backend
        self.max_wait = max_wait  # how long a stream waits for a run Prefect has not started
        self.prefect: PrefectRuns | None = None
        self.reachable: bool | None = None  # None: not checked (no API, or not yet)
        self.error: str | None = None
        self.reconciled = 0  # runs this process ended
        self._watched = watched
        self._interval = interval
        self._grace = grace
        self._timeout = timeout
        self._ended: set[str] = set()  # watched runs seen ended: not asked about again
        # run -> (its head, since when) while Prefect says final: ended once quiet for grace
        self._quiet: dict[str, tuple[int, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._lookups: dict[str, asyncio.Future[RunState | None]] = {}  # one call per run at once

    async def start(self) -> None:
        """Connect a client for Prefect's API; in the background, say once whether it answers,
        then check the watched runs every interval."""
        try:
            self.prefect = await PrefectRuns.connect(self._timeout)
        except Exception as exc:  # a malformed PREFECT_API_URL or profile
            self.error = describe("Prefect client", exc)
            logger.warning("prefect-ws: Prefect API client unavailable (%s)", self.error)
            return
        if self.prefect is None:  # a choice, not a fault: said at the INFO level
            logger.info(
                "prefect-ws: PREFECT_API_URL is not set: streams end only by their flows' "
                "own hooks (a killed or cancelled run's stream stays open)"
            )
            return
        # Checked in the background: a slow API must not hold up serving.
        self._task = asyncio.create_task(self._run(), name="prefect-ws reconciler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.prefect is not None:
            with contextlib.suppress(Exception):
                await self.prefect.close()

    @property
    def api_url(self) -> str | None:
        return self.prefect.api_url if self.prefect is not None else None

    def status(self) -> dict[str, Any]:
        """The ``prefect`` field of ``/healthz``."""
        if self.prefect is None:
            return {"reconciling": False, "error": self.error or "PREFECT_API_URL is not set"}
        return {
            "reconciling": True,
            "api": self.api_url,
            "reachable": self.reachable,
            "error": self.error,
            "reconciled": self.reconciled,
        }

    def _set_reachable(self, reachable: bool, error: str | None) -> None:
        if reachable != self.reachable:
            if reachable and self.reachable is not None:
                logger.warning("prefect-ws: the Prefect API at %s answers again", self.api_url)
            elif not reachable:
                logger.warning(
                    "prefect-ws: the Prefect API at %s is unavailable (%s): streams still work, "
                    "but a run whose process cannot end its stream is ended only once it is back",
                    self.api_url,
                    error,
                )
        self.reachable, self.error = reachable, error

    async def lookup(self, run_id: str) -> RunState | None:
        """The run as Prefect records it, for a stream opened before the run published anything;
        None when Prefect does not know it, rejects the id, or does not answer.

        While the API is known to be unavailable nothing is asked (clients get what they would
        without Prefect, at once); clients opening the same run at once share one call.
        """
        if self.prefect is None or self.reachable is False:
            return None
        pending = self._lookups.get(run_id)
        if pending is None:
            pending = self._lookups[run_id] = asyncio.ensure_future(self._lookup(run_id))
            pending.add_done_callback(lambda _: self._lookups.pop(run_id, None))
        return await asyncio.shield(pending)

    async def _lookup(self, run_id: str) -> RunState | None:
        assert self.prefect is not None
        try:
            state = await self.prefect.lookup(run_id)
        except PrefectUnavailable as exc:
            self._set_reachable(False, str(exc))
            return None
        self._set_reachable(True, None)
        return state

    async def end(self, run_id: str, state: RunState) -> bool:
        """End a run's stream now (Prefect recorded it final); True if this process did."""
        ended = await end_run(self.backend, run_id, state)
        if ended:
            self.reconciled += 1
            logger.info("run %s ended from Prefect's record: %s", run_id, state.name)
        return ended

    async def _run(self) -> None:
        assert self.prefect is not None
        try:
            await self.prefect.ping()
            self._set_reachable(True, None)
            logger.info("prefect-ws: reconciling run ends with Prefect at %s", self.api_url)
        except PrefectUnavailable as exc:
            self._set_reachable(False, str(exc))
        while True:
            await asyncio.sleep(self._interval)
            try:
                if self.reachable is False:  # lookups wait for this to say it is back
                    await self.prefect.ping()
                    self._set_reachable(True, None)
                await self.check()
            except PrefectUnavailable:
                pass  # still unavailable: said when it became so
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a backend outage: the next round tries again
                logger.warning("prefect-ws: reconciling run ends failed (%s)", exc)

    async def check(self) -> None:
        """One round: ask Prefect about every watched run not known to have ended."""
        assert self.prefect is not None
        watched = set(self._watched())
        self._ended &= watched
        for run_id in list(self._quiet):
            if run_id not in watched:
                del self._quiet[run_id]
        candidates = sorted(watched - self._ended)
        if not candidates:
            return
        try:
            states = await self.prefect.states(candidates)
        except PrefectUnavailable as exc:
            self._set_reachable(False, str(exc))
            return
        self._set_reachable(True, None)
        for run_id, state in states.items():
            if not state.final:
                self._quiet.pop(run_id, None)
                continue
            info = await self.backend.info(run_id)
            if info.last is not None and frame_from_text(info.last).is_final:
                self._ended.add(run_id)  # its hooks ended it: nothing to ask about any more
                continue
            now = time.monotonic()
            seen = self._quiet.get(run_id)
            if seen is None or seen[0] != info.head:
                self._quiet[run_id] = (info.head, now)  # still publishing: give its hooks time
                if self._grace > 0:
                    continue
            elif now - seen[1] < self._grace - QUIET_TOLERANCE:
                continue
            if await self.end(run_id, state):
                self._ended.add(run_id)  # else the next round sees who ended it, or tries again
