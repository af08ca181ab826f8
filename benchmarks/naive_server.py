"""The naive baseline for the fan-out benchmark: one broadcaster subscription per client.

The textbook Starlette + broadcaster endpoint, on prefect-ws' own Redis backend (broadcaster's
stock one delivers nothing with redis-py 8): every client calls ``broadcast.subscribe(run_id)``,
so broadcaster keeps one unbounded queue per client and each client's task decodes nothing but
sends every line of every message itself. No history, no ordering checks, no bounds. It sends
``{"type":"ready"}`` once Redis confirmed the channel's subscription (the backend's RESYNC
message), so a load client knows when to start counting and the baseline loses no events to
that race; it closes with 1000 after ``run_complete`` like the real endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from prefect_ws.backends import RESYNC, create_transport
from prefect_ws.settings import Settings

_FINAL = '{"v":1,"type":"run_complete"'


def create_naive_app(settings: Settings) -> Starlette:
    transport = create_transport(settings)
    broadcast: Broadcast = transport.broadcast
    confirmed: dict[str, asyncio.Event] = {}

    async def stream(websocket: WebSocket) -> None:
        run_id = websocket.path_params["run_id"]
        await websocket.accept()
        subscribed = confirmed.setdefault(run_id, asyncio.Event())
        async with broadcast.subscribe(run_id) as subscriber:

            async def announce() -> None:
                # The backend's RESYNC marks the subscription confirmed; newer backends also
                # answer is_live() (broadcaster drops a RESYNC that beats the queue's creation).
                is_live = getattr(transport.backend, "is_live", None)
                deadline = asyncio.get_running_loop().time() + 10
                while not subscribed.is_set():
                    if is_live is not None and is_live(run_id):
                        subscribed.set()
                    elif asyncio.get_running_loop().time() > deadline:
                        raise TimeoutError("subscription not confirmed")
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(subscribed.wait(), 0.02)
                await websocket.send_text('{"type":"ready"}')

            ready = asyncio.create_task(announce())

            async def drain() -> None:
                while (await websocket.receive())["type"] != "websocket.disconnect":
                    pass

            reader = asyncio.create_task(drain())
            try:
                async for event in subscriber:
                    if event.message == RESYNC:
                        subscribed.set()
                        continue
                    await ready
                    done = False
                    for line in event.message.split("\n"):
                        await websocket.send_text(line)
                        done = done or line.startswith(_FINAL)
                    if done:
                        await websocket.close(1000, "run complete")
                        break
            except Exception:
                pass  # the client went away mid-send
            finally:
                reader.cancel()
                ready.cancel()
                await asyncio.gather(reader, ready, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await broadcast.connect()
        try:
            yield
        finally:
            await broadcast.disconnect()

    return Starlette(
        routes=[WebSocketRoute("/api/v2/workflows/runs/{run_id}/stream", stream)],
        lifespan=lifespan,
    )
