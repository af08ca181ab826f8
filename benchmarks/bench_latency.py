"""End-to-end latency: ``logger.info`` in a task -> the line at a WebSocket client.

    .venv/bin/python benchmarks/bench_latency.py [--quick] [--repeats 3] [--lines 500]

One Prefect server (``prefect server start``, log stream flags on), one prefect-ws server (Redis
backend), and per repetition one flow run in its own process that logs ``--lines`` lines at
100 lines/s, each stamped with ``time.time_ns()`` just before the ``logger.info`` call. Two
clients watch the same run at the same time: the prefect-ws stream and Prefect's own
``/api/logs/out`` stream (``prefect.logging.clients.get_logs_subscriber``). The flow process
uses Prefect's default API log batching (2 s) in one set of runs and
``PREFECT_LOGGING_TO_API_BATCH_INTERVAL=0.1`` in another; prefect-ws is measured in both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any

from _common import (
    HERE,
    PYTHON,
    REDIS_URL,
    cleanup_redis,
    latency_summary,
    median,
    prefect_server,
    prefect_ws_server,
    print_table,
    raise_nofile,
    ratio,
    redis_prefix,
    with_bench_path,
    write_results,
)

BATCH_INTERVALS = ("2.0", "0.1")


def _latency_of(message: str, received_ns: int) -> int | None:
    parts = message.split()
    if len(parts) == 3 and parts[0] == "lat":
        return received_ns - int(parts[2])
    return None


async def watch_prefect_ws(url: str, out: list[int], connected: asyncio.Event) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, compression=None, max_size=2**24) as websocket:
        connected.set()
        async for message in websocket:
            now = time.time_ns()
            event = json.loads(message)
            if event["type"] == "step_log":
                latency = _latency_of(event["payload"]["message"], now)
                if latency is not None:
                    out.append(latency)


async def watch_prefect(run_id: str, lines: int, out: list[int], connected: asyncio.Event) -> None:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.clients import get_logs_subscriber

    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(run_id)]))
    async with get_logs_subscriber(filter=log_filter) as subscriber:
        connected.set()
        async for log in subscriber:
            latency = _latency_of(log.message, time.time_ns())
            if latency is not None:
                out.append(latency)
                if len(out) >= lines:
                    return


async def one_run(
    base_url: str, flow_env: dict[str, str], batch_interval: str, lines: int, rate: float
) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    sys.path.insert(0, str(HERE))
    from _flows import latency_flow

    async with get_client() as client:
        run_id = str((await client.create_flow_run(latency_flow, parameters={"lines": lines})).id)
    ours: list[int] = []
    theirs: list[int] = []
    ours_ready, theirs_ready = asyncio.Event(), asyncio.Event()
    # wait=: the flow has not started yet (without it a newer server closes with 4404).
    stream_url = f"{base_url}/api/v2/workflows/runs/{run_id}/stream?wait=120"
    watchers = [
        asyncio.create_task(watch_prefect_ws(stream_url, ours, ours_ready)),
        asyncio.create_task(watch_prefect(run_id, lines, theirs, theirs_ready)),
    ]
    async with asyncio.timeout(30):
        await ours_ready.wait()
        await theirs_ready.wait()
    await asyncio.sleep(0.5)  # let Prefect's server register the filter before the first line
    env = with_bench_path(
        {
            **os.environ,
            **flow_env,
            "PREFECT_LOGGING_TO_API_ENABLED": "true",
            "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": batch_interval,
        }
    )
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        str(HERE / "_run_flow.py"),
        "latency_flow",
        run_id,
        json.dumps({"lines": lines, "rate": rate}),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), lines / rate + 120)
    report = json.loads(stdout.decode().strip().splitlines()[-1])
    # Ours ends with run_complete; Prefect's stream has no end: give it 2 batch intervals + 3 s.
    _, pending = await asyncio.wait(watchers, timeout=2 * float(batch_interval) + 3)
    for task in pending:
        task.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    return {
        "run_id": run_id,
        "batch_interval": batch_interval,
        "flow": report,
        "prefect_ws": latency_summary(ours),
        "prefect_logs_out": latency_summary(theirs),
    }


async def run_all(
    args: argparse.Namespace, flow_env: dict[str, str], base_url: str
) -> list[dict[str, Any]]:
    results = []
    for repeat in range(args.repeats):
        for batch_interval in BATCH_INTERVALS:
            result = await one_run(base_url, flow_env, batch_interval, args.lines, args.rate)
            result["repeat"] = repeat
            results.append(result)
            print(
                f"batch={batch_interval} prefect-ws {result['prefect_ws']} "
                f"logs/out {result['prefect_logs_out']}",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--prefect-api-url", default="", help="use this running Prefect server")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.lines = 1, 20
    raise_nofile()

    prefix = redis_prefix("latency")
    ws_env = {"PREFECT_WS_BROADCAST_URL": REDIS_URL, "PREFECT_WS_REDIS_PREFIX": prefix}
    try:
        with prefect_server(args.prefect_api_url or None) as prefect_env:
            os.environ.update(prefect_env)  # this process's Prefect client and subscriber
            with prefect_ws_server(REDIS_URL, prefix) as (_, port):
                flow_env = {**prefect_env, **ws_env}
                results = asyncio.run(run_all(args, flow_env, f"ws://127.0.0.1:{port}"))
    finally:
        cleanup_redis(prefix)

    rows = []
    summary = {}
    for batch_interval in BATCH_INTERVALS:
        runs = [r for r in results if r["batch_interval"] == batch_interval]
        entry = {}
        for stream in ("prefect_ws", "prefect_logs_out"):
            entry[stream] = {
                key: median([r[stream][key] for r in runs])
                for key in ("p50_ms", "p99_ms", "max_ms")
            }
            entry[stream]["received"] = sum(r[stream]["n"] for r in runs)
        entry["p50_ratio"] = ratio(
            entry["prefect_logs_out"]["p50_ms"], entry["prefect_ws"]["p50_ms"]
        )
        summary[batch_interval] = entry
        expected = args.lines * len(runs)
        for stream, label in (
            ("prefect_ws", "prefect-ws"),
            ("prefect_logs_out", "Prefect /api/logs/out"),
        ):
            s = entry[stream]
            rows.append(
                [
                    f"{batch_interval} s",
                    label,
                    f"{s['received']}/{expected}",
                    s["p50_ms"],
                    s["p99_ms"],
                    s["max_ms"],
                    entry["p50_ratio"] if stream == "prefect_logs_out" else "",
                ]
            )
    print_table(
        f"logger.info -> WebSocket client, {args.rate:g} lines/s (median of {args.repeats} runs)",
        [
            "Prefect API log batch",
            "stream",
            "received",
            "p50 ms",
            "p99 ms",
            "max ms",
            "p50 x prefect-ws",
        ],
        rows,
    )
    write_results(
        "latency",
        args.quick,
        {
            "lines": args.lines,
            "rate": args.rate,
            "repeats": args.repeats,
            "summary": summary,
            "runs": results,
        },
    )


if __name__ == "__main__":
    main()
