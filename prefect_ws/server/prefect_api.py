"""What the server asks Prefect's API about flow runs: the one module that talks to it.

Prefect's own record of a run is the truth about how it ended; the server reads it with Prefect's
public client (``get_client``, ``read_flow_run``, ``read_flow_runs``) against ``PREFECT_API_URL``
(a Prefect server or Prefect Cloud, with ``PREFECT_API_KEY``). Every call is bounded in time and
turns any failure (unreachable, slow, an error status, an answer that is not a flow run) into
:class:`PrefectUnavailable`, so a broken API costs a log line and never a stream.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import httpx

FINAL_STATES: Final = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
RUN_STATUS_OF: Final = {
    "COMPLETED": "completed",
    "FAILED": "failed",
    "CRASHED": "crashed",
    "CANCELLED": "cancelled",
}
LOOKUP_CHUNK: Final = 200  # flow run ids per read_flow_runs call (Prefect's default page size)


def without_credentials(url: str) -> str:
    """``url`` without a ``user:password@`` part, fit for a log line."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


_USERINFO: Final = re.compile(r"//[^/@\s]+@")


def describe(what: str, exc: BaseException) -> str:
    """One line for a failed call: no credentials (an HTTP error names the URL), at most 300
    characters."""
    return _USERINFO.sub("//", f"{what}: {type(exc).__name__}: {exc}")[:300]


class PrefectUnavailable(Exception):
    """The API did not answer usefully in time; the message says how."""


@dataclass(frozen=True, slots=True)
class RunState:
    """A flow run as Prefect records it: its state type (``COMPLETED``...) and name (``Late``)."""

    run_id: str
    type: str
    name: str
    message: str | None
    duration: float | None  # seconds Prefect counted the run as running

    @property
    def final(self) -> bool:
        return self.type in FINAL_STATES

    @property
    def run_status(self) -> str:
        """The ``run_complete`` status of a final state."""
        return RUN_STATUS_OF[self.type]


def _run_state(flow_run: Any) -> RunState:
    state = flow_run.state
    if state is None:  # a run created without a state: Prefect treats it as not started
        return RunState(str(flow_run.id), "PENDING", "Pending", None, None)
    total = getattr(flow_run, "total_run_time", None)
    seconds = total.total_seconds() if total is not None else None
    return RunState(
        run_id=str(flow_run.id),
        type=str(state.type.value),
        name=str(state.name),
        message=state.message,
        duration=round(seconds, 6) if seconds else None,
    )


class PrefectRuns:
    """Flow-run reads from Prefect's API with one long-lived client."""

    def __init__(self, api_url: str, client: Any, timeout: float) -> None:
        self.api_url = without_credentials(api_url)  # shown in logs and /healthz
        self._client = client
        self._timeout = timeout

    @classmethod
    async def connect(cls, timeout: float) -> PrefectRuns | None:
        """A reader for the API named by ``PREFECT_API_URL``; None when no API URL is set
        (Prefect would otherwise start a temporary in-process server of its own).

        Imports Prefect in a thread (about 1.5 s) so the event loop keeps serving.
        """

        def load() -> tuple[str | None, Any]:
            from prefect.client.orchestration import get_client
            from prefect.settings import get_current_settings

            url = get_current_settings().api.url
            if not url:
                return None, None
            # No connection retries (Prefect's client sets 3: 1.5 s before a refused connection
            # fails): a stream waiting on a lookup waits for one attempt; the poll retries.
            transport = httpx.AsyncHTTPTransport(retries=0)
            return url, get_client(httpx_settings={"timeout": timeout, "transport": transport})

        url, client = await asyncio.to_thread(load)
        if url is None:
            return None
        await client.__aenter__()
        return cls(url, client, timeout)

    async def close(self) -> None:
        await self._client.__aexit__(None, None, None)

    async def _call(self, what: str, call: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                return await call
        except TimeoutError:
            raise PrefectUnavailable(f"{what}: no answer within {self._timeout:g} s") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise PrefectUnavailable(describe(what, exc)) from None

    async def ping(self) -> None:
        """Raise :class:`PrefectUnavailable` unless the API answers a flow-run read: a health
        endpoint alone says nothing of an API that answers garbage."""
        await self._call("read_flow_runs", self._client.read_flow_runs(limit=1))

    async def lookup(self, run_id: str) -> RunState | None:
        """The run as Prefect records it; None when Prefect does not know it or rejects the id."""
        from prefect.exceptions import ObjectNotFound

        try:
            async with asyncio.timeout(self._timeout):
                flow_run = await self._client.read_flow_run(uuid.UUID(run_id))
        except ObjectNotFound:
            return None
        except TimeoutError:
            raise PrefectUnavailable(
                f"read_flow_run: no answer within {self._timeout:g} s"
            ) from None
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if isinstance(status, int) and 400 <= status < 500 and status not in (401, 403, 429):
                return None  # Prefect rejects the id: for a client, the run is unknown
            raise PrefectUnavailable(describe("read_flow_run", exc)) from None
        return self._checked(flow_run, run_id)

    async def states(self, run_ids: list[str]) -> dict[str, RunState]:
        """The runs Prefect knows among ``run_ids``, in one call per 200 ids."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        found: dict[str, RunState] = {}
        wanted = set(run_ids)
        for start in range(0, len(run_ids), LOOKUP_CHUNK):
            chunk = [uuid.UUID(r) for r in run_ids[start : start + LOOKUP_CHUNK]]
            flow_runs = await self._call(
                "read_flow_runs",
                self._client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)),
                    limit=len(chunk),
                ),
            )
            for flow_run in flow_runs:
                state = self._checked(flow_run)
                if state.run_id in wanted:  # an API answering about other runs is ignored
                    found[state.run_id] = state
        return found

    def _checked(self, flow_run: Any, run_id: str | None = None) -> RunState:
        try:
            state = _run_state(flow_run)
        except Exception as exc:
            raise PrefectUnavailable(f"unexpected flow run: {type(exc).__name__}") from None
        if run_id is not None and state.run_id != run_id:
            raise PrefectUnavailable("the API answered about another flow run")
        return state
