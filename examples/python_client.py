"""Follow one prefect-ws run from Python with nothing but ``websockets``.

    python examples/python_client.py RUN_ID [--url ws://127.0.0.1:8000] [--token TOKEN]

Prints one line per event and exits 0 when the run completed, 1 when it did not. The protocol in
a nutshell (docs/clients.md):

- connect to ``/api/v2/workflows/runs/{run_id}/stream?since=<last seq>&wait=60``;
- frames without ``seq`` are control frames (``hello``): skip them;
- every event has a ``seq`` (1, 2, 3, ... per run); remember the last one;
- ``run_complete`` is the last event, then the server closes with 1000;
- on any other close or a dropped connection, reconnect with ``since=<last seq>``: the server
  replays exactly what you missed, nothing twice.

``prefect_ws.clients.follow`` does the same in a library; this file shows there is no magic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

DO_NOT_RETRY = {1008, 4400, 4401, 4403, 4404}  # refused: retrying unchanged will not help


async def follow(base_url: str, run_id: str, token: str | None) -> str | None:
    """Print the run's events; return the run's final status (None if refused)."""
    last_seq = 0
    headers = {"Authorization": f"Bearer {token}"} if token else None
    delay = 0.2
    while True:
        # wait=60: a run that has not started yet is waited for, not refused with 4404.
        url = f"{base_url}/api/v2/workflows/runs/{run_id}/stream?since={last_seq}&wait=60"
        try:
            async with connect(url, additional_headers=headers, compression=None) as ws:
                delay = 0.2
                async for message in ws:
                    event = json.loads(message)
                    if "seq" not in event or event["seq"] <= last_seq:
                        continue  # a control frame, or something already seen
                    last_seq = event["seq"]
                    payload = event["payload"]
                    print(
                        f"#{event['seq']:<4} {event['type']:<14} {describe(event['type'], payload)}"
                    )
                    if event["type"] == "run_complete":
                        return str(payload["status"])
                code, reason = ws.close_code, ws.close_reason
        except InvalidStatus as exc:  # refused before the upgrade (auth, origin, limits)
            print(f"refused: HTTP {exc.response.status_code}", file=sys.stderr)
            return None
        except (ConnectionClosed, OSError) as exc:
            code, reason = 1006, str(exc)
        if code in DO_NOT_RETRY:
            print(f"refused: {code} {reason}", file=sys.stderr)
            return None
        print(f"connection lost ({code}); resuming after seq {last_seq}", file=sys.stderr)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


def describe(kind: str, payload: dict) -> str:
    if kind == "run_start":
        return f"{payload['flowName']} ({payload['flowRunName']})"
    if kind == "step_start":
        return f"{payload['stepId']} (attempt {payload['attempt']})"
    if kind == "step_log":
        return f"{payload['level']:<7} [{payload['stepId'] or 'flow'}] {payload['message']}"
    if kind == "step_complete":
        return f"{payload['stepId']} {payload['status']}" + (
            f": {payload['error']}" if payload.get("error") else ""
        )
    if kind == "run_complete":
        return f"{payload['status']} in {payload['duration']:.2f}s"
    return json.dumps(payload)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id", help="the flow run id (UUID)")
    parser.add_argument("--url", default="ws://127.0.0.1:8000", help="prefect-ws server")
    parser.add_argument("--token", default=None, help="access token, if the server needs one")
    args = parser.parse_args()
    try:
        run_id = str(uuid.UUID(args.run_id))
    except ValueError:
        parser.error(f"not a flow run id: {args.run_id!r}")
    status = asyncio.run(follow(args.url.rstrip("/"), run_id, args.token))
    return 0 if status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
