"""The fan-out server people write with python-websockets: ``broadcast()`` over Redis pub/sub.

    python benchmarks/anchors/websockets_server.py --port P
    (PREFECT_WS_BROADCAST_URL, PREFECT_WS_REDIS_PREFIX from the environment)

One Redis subscription per run (shared by the run's clients, one listener task for all), every
line of every message sent to every client of the run with ``websockets.broadcast`` (one write
per client per frame, no backpressure), close 1000 after ``run_complete``. No history, no
ordering checks, no bounds: the same job as ``naive_server.py``. A client first gets
``{"type":"ready"}`` once Redis confirmed the run's subscription.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, broadcast, serve

FINAL = '{"v":1,"type":"run_complete"'
PATH = re.compile(r"^/api/v2/workflows/runs/([^/?]+)/stream")


@dataclass
class Run:
    clients: set[ServerConnection] = field(default_factory=set)
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)


class Fanout:
    def __init__(self, url: str, prefix: str) -> None:
        self.prefix = prefix
        self.redis = aioredis.Redis.from_url(url)
        self.pubsub = self.redis.pubsub()
        self.runs: dict[str, Run] = {}
        self.listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # An anchor channel opens the pub/sub connection before any client subscribes.
        await self.pubsub.subscribe(f"{self.prefix}:anchor")
        self.listener = asyncio.create_task(self.listen())

    async def listen(self) -> None:
        while True:
            message = await self.pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            run = self.runs.get(message["channel"].decode())
            if run is None:
                continue
            if message["type"] == "subscribe":
                run.confirmed.set()
            elif message["type"] == "message":
                lines = message["data"].decode().split("\n")
                clients = run.clients
                for line in lines:
                    broadcast(clients, line)
                if lines[-1].startswith(FINAL):
                    for client in list(clients):
                        await client.close(1000, "run complete")

    async def handle(self, websocket: ServerConnection) -> None:
        match = PATH.match(websocket.request.path if websocket.request else "")
        if match is None:
            await websocket.close(4400, "unknown path")
            return
        channel = f"{self.prefix}:{{{match.group(1)}}}"
        run = self.runs.get(channel)
        if run is None:
            run = self.runs[channel] = Run()
            await self.pubsub.subscribe(channel)
        run.clients.add(websocket)
        try:
            await run.confirmed.wait()
            await websocket.send('{"type":"ready"}')
            await websocket.wait_closed()
        finally:
            run.clients.discard(websocket)
            if not run.clients and self.runs.get(channel) is run:
                del self.runs[channel]
                await self.pubsub.unsubscribe(channel)


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


async def main(port: int) -> None:
    fanout = Fanout(
        os.environ.get("PREFECT_WS_BROADCAST_URL", "redis://127.0.0.1:6379/0"),
        os.environ.get("PREFECT_WS_REDIS_PREFIX", "prefect-ws"),
    )
    await fanout.start()
    async with serve(
        fanout.handle, "127.0.0.1", port, compression=None, max_queue=16, backlog=8192
    ) as server:
        await server.serve_forever()


if __name__ == "__main__":
    _exit_with_parent()
    # A port probe (connect, close) is not a failed handshake worth a traceback.
    logging.getLogger("websockets.server").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
