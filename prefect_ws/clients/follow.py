"""A Python client for the stream: follow a run, resuming with ``since`` after any drop.

``follow`` yields each event once, in ``seq`` order, and returns after ``run_complete``.

A run's ``seq`` counts within one history. If the backend loses a run's history and it begins
again (Redis restarted empty), the ``hello`` frame names another ``epoch``: the client sends the
epoch it knew with each reconnect, the server then starts again from the new history's first
event (``"reset": true`` in ``hello``), and the client starts counting again and reports it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from prefect_ws.protocol import closecodes

logger = logging.getLogger("prefect_ws.client")

# Codes after which reconnecting with since=<last seq> is the right move.
RESUMABLE = frozenset(
    {
        closecodes.GOING_AWAY,
        1006,
        closecodes.INTERNAL_ERROR,
        closecodes.SERVICE_RESTART,
        closecodes.TRY_AGAIN_LATER,
    }
)


class StreamError(Exception):
    """The server refused the stream; retrying unchanged will not help."""

    def __init__(self, code: int | None, reason: str, *, status: int | None = None) -> None:
        where = f"close code {code}" if code is not None else f"HTTP {status}"
        super().__init__(f"{reason} ({where})")
        self.code = code
        self.reason = reason
        self.status = status  # HTTP status when the handshake itself was refused


def stream_url(
    base: str,
    run_id: str,
    since: int = 0,
    *,
    types: Sequence[str] = (),
    steps: Sequence[str] = (),
    level: str | None = None,
    wait: float | None = None,
    epoch: str | None = None,
) -> str:
    """``ws://host:port`` + run id -> the run's stream URL, with ``since`` and filters.

    ``wait`` (seconds) asks the server to wait for a run that has not published yet instead of
    closing with 4404 (unknown run): for "subscribe, then trigger".
    """
    url = f"{base.rstrip('/')}/api/v2/workflows/runs/{quote(run_id, safe='')}/stream"
    query: list[tuple[str, str | int]] = []
    if since:
        query.append(("since", since))
    if types:
        query.append(("types", ",".join(types)))
    query.extend(("step", step) for step in steps)
    if level:
        query.append(("level", level))
    if wait is not None:
        query.append(("wait", f"{wait:g}"))
    if epoch is not None:
        query.append(("epoch", epoch))
    return f"{url}?{urlencode(query)}" if query else url


async def follow_messages(
    base_url: str,
    run_id: str,
    *,
    since: int = 0,
    types: Sequence[str] = (),
    steps: Sequence[str] = (),
    level: str | None = None,
    wait: float | None = None,
    token: str | None = None,
    max_retries: int = 30,
    connect_retries: int | None = None,
    open_timeout: float = 10.0,
    on_reconnect: Callable[[int, str], None] | None = None,
    on_reset: Callable[[int], None] | None = None,
    on_hello: Callable[[dict[str, Any]], None] | None = None,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Yield ``(text, event)`` for each event after ``since``, exactly as the server sent it.

    Frames without ``seq`` (control frames such as ``hello``) are skipped. After a drop the
    client reconnects with ``since=<last seq>``, so nothing is lost or repeated. The token goes
    in an ``Authorization`` header rather than the URL, so it stays out of proxy logs.
    ``on_reconnect(code, reason)`` is called once per outage, before its first reconnect;
    ``on_hello(frame)`` with each connection's ``hello`` (``waiting``: the run has not started).
    ``connect_retries`` caps the attempts before the first connection succeeds (a wrong URL
    should fail in a second, not after ``max_retries`` backoffs).
    ``on_reset(last_seq)`` is called when the run's history was lost and begun again: events
    after ``last_seq`` of the old history may never have been seen, and the events that follow
    are the new history's from its first ``seq``.
    """
    last_seq = since
    epoch: str | None = None  # the history last_seq counts in, from the first hello
    failures = 0
    connected = False
    headers = {"Authorization": f"Bearer {token}"} if token else None
    while True:
        try:
            async with connect(
                stream_url(
                    base_url,
                    run_id,
                    last_seq,
                    types=types,
                    steps=steps,
                    level=level,
                    wait=wait,
                    epoch=epoch if last_seq else None,
                ),
                open_timeout=open_timeout,
                max_size=2**24,
                compression=None,
                additional_headers=headers,
            ) as websocket:
                failures = 0
                connected = True
                async for message in websocket:
                    text = message if isinstance(message, str) else message.decode("utf-8")
                    event = json.loads(text)
                    if isinstance(event, dict) and event.get("type") == "hello":
                        if event.get("reset") or (
                            epoch is not None and event.get("epoch") != epoch
                        ):
                            logger.warning(
                                "history of run %s was reset (epoch %s -> %s): events after seq "
                                "%d may be lost; following the new history from seq 1",
                                run_id,
                                epoch,
                                event.get("epoch"),
                                last_seq,
                            )
                            if on_reset is not None:
                                on_reset(last_seq)
                            last_seq = 0
                        epoch = event.get("epoch")
                        if on_hello is not None:
                            on_hello(event)
                        continue
                    seq = event.get("seq") if isinstance(event, dict) else None
                    if not isinstance(seq, int) or seq <= last_seq:
                        continue
                    last_seq = seq
                    yield text, event
                    if event.get("type") == "run_complete":
                        return
                code, reason = _close_of(websocket)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            code, reason = (rcvd.code, rcvd.reason) if rcvd else (1006, "connection lost")
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403, 404, 400):
                body = (exc.response.body or b"").decode("utf-8", "replace").strip()[:200]
                raise StreamError(None, f"HTTP {status} {body}".strip(), status=status) from None
            code, reason = 1006, f"HTTP {status}"
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            code, reason = 1006, str(exc) or type(exc).__name__
        if code == closecodes.RUN_COMPLETE:
            return
        if code not in RESUMABLE:
            raise StreamError(code, reason)
        failures += 1
        limit = max_retries if connected or connect_retries is None else connect_retries
        if failures > limit:
            raise StreamError(code, f"gave up after {limit} reconnects: {reason}")
        if on_reconnect is not None and failures == 1:
            on_reconnect(code, reason)
        await asyncio.sleep(min(0.1 * 2**failures, 5.0))


async def follow(
    base_url: str,
    run_id: str,
    *,
    since: int = 0,
    max_retries: int = 30,
    open_timeout: float = 10.0,
    **options: Any,
) -> AsyncIterator[dict[str, Any]]:
    """Yield the run's events from ``since`` on; reconnect and resume when the connection drops.

    ``options`` are those of :func:`follow_messages` (``types``, ``steps``, ``level``, ``token``).
    """
    async for _, event in follow_messages(
        base_url, run_id, since=since, max_retries=max_retries, open_timeout=open_timeout, **options
    ):
        yield event


def _close_of(websocket: Any) -> tuple[int, str]:
    rcvd = websocket.close_code
    return (rcvd if rcvd is not None else 1006), (websocket.close_reason or "")
