"""Catch-up: K clients join a finished run of N stored events with ``since=0``; total events/s.

    .venv/bin/python benchmarks/bench_catchup.py [--quick] [--events 100000] [--clients 10]
    .venv/bin/python benchmarks/bench_catchup.py --variant gc-default:BENCH_GC=default
    .venv/bin/python benchmarks/bench_catchup.py --client python

The publisher (the real ``Publisher.emit`` path) stores N ``step_log`` events and
``run_complete`` first; then K clients (one load client process) connect with ``since=0`` at
once and read the run to its end, all of it from the stored history (Redis ``XRANGE`` pages):
the path a late joiner or a client that fell far behind takes. Reported: total delivered
events/s (first connect -> last frame at the last client), server CPU per delivered event and
the load client's own CPU. ``--variant`` starts one more prefect-ws server with extra
environment variables and alternates the two, for A/B ratios from the same minutes.

The load client is ``anchors/node/load.js`` where Node is installed: ``_wsload.py`` (``--client
python``, and the fallback, with a line saying why) spends ~6 us of CPU per event, which caps
the measurement near 150k events/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from _anchors import LOAD_CLIENTS, stream_load_client
from _common import (
    HERE,
    PYTHON,
    REDIS_URL,
    cleanup_redis,
    cpu_seconds,
    median,
    prefect_ws_server,
    print_table,
    raise_nofile,
    ratio,
    redis_prefix,
    results_dir,
    top_frames,
    write_results,
)
from bench_fanout import parse_variants, publisher_env, start_profile


def store_run(prefix: str, events: int) -> str:
    """A finished run of ``events`` log events in the history."""
    run_id = str(uuid.uuid4())
    subprocess.run(
        [PYTHON, str(HERE / "_publish.py"), "--run-id", run_id, "--n", str(events), "--no-wait"],
        env=publisher_env(prefix),
        stdout=subprocess.DEVNULL,
        check=True,
        timeout=600,
    )
    return run_id


def catch_up(
    port: int,
    pid: int,
    run_id: str,
    clients: int,
    deadline: float,
    load_client: list[str],
    profile: Path | None = None,
) -> dict[str, Any]:
    """One catch-up; ``load_client`` is the command of :func:`stream_load_client`; ``profile``:
    py-spy the server into this file meanwhile."""
    url = f"ws://127.0.0.1:{port}/api/v2/workflows/runs/{run_id}/stream?since=0"
    spy = start_profile(pid, profile) if profile else None
    cpu0 = cpu_seconds(pid)
    start_ns = time.time_ns()
    out = subprocess.run(
        [
            *load_client,
            "--mode",
            "stream",
            "--url",
            url,
            "--count",
            str(clients),
            "--deadline",
            str(deadline),
        ],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        timeout=deadline + 60,
    )
    server_cpu = cpu_seconds(pid) - cpu0
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        spy.wait(30)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    seconds = (report["last_recv_ns"] - start_ns) / 1e9
    delivered = report["delivered"]
    return {
        "clients": clients,
        "delivered": delivered,
        "complete": report["finished"],
        "out_of_order": report["out_of_order"],
        "close_codes": report["close_codes"],
        "seconds": round(seconds, 3),
        "events_per_s": round(delivered / seconds, 1) if seconds > 0 else None,
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_us_per_event": round(1e6 * server_cpu / delivered, 2) if delivered else None,
        "client_cpu_pct": round(100 * report["cpu_s"] / seconds, 1) if seconds > 0 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], help="as in bench_fanout.py")
    parser.add_argument("--tag", default="", help="suffix for the result file")
    parser.add_argument(
        "--client",
        choices=LOAD_CLIENTS,
        help="load client: node (anchors/node/load.js; the default where Node is installed) "
        "or python (_wsload.py; ~6 us CPU per event)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the server in the first repetition"
    )
    args = parser.parse_args()
    if args.quick:
        args.events, args.clients, args.repeats = 500, 2, 1
    raise_nofile()
    try:
        client, load_client = stream_load_client(args.client)
    except RuntimeError as exc:
        parser.error(str(exc))
    print(f"load client: {client}", flush=True)
    variants = parse_variants(args.variant)
    modes = ["prefect-ws", *variants]
    prefix = redis_prefix("catchup")
    results: list[dict[str, Any]] = []
    try:
        with contextlib.ExitStack() as stack:
            servers = {
                mode: stack.enter_context(
                    prefect_ws_server(REDIS_URL, prefix, extra_env=variants.get(mode))
                )
                for mode in modes
            }
            run_id = store_run(prefix, args.events)
            expected = args.clients * (args.events + 1)
            for repeat in range(args.repeats):
                for mode in modes if repeat % 2 == 0 else reversed(modes):
                    proc, port = servers[mode]
                    profile = (
                        results_dir() / f"profile-catchup-{mode}.txt"
                        if args.profile and repeat == 0
                        else None
                    )
                    result = catch_up(
                        port, proc.pid, run_id, args.clients, 600.0, load_client, profile
                    )
                    if profile is not None and profile.exists():
                        result["profile_top"] = top_frames(profile)
                    result.update(mode=mode, repeat=repeat, expected=expected, client=client)
                    results.append(result)
                    print(result, flush=True)
    finally:
        cleanup_redis(prefix)

    def select(mode: str) -> list[dict[str, Any]]:
        return [r for r in results if r["mode"] == mode]

    rows = []
    for mode in modes:
        runs = select(mode)
        ratios = [
            ratio(a["events_per_s"], b["events_per_s"])
            for a, b in zip(select("prefect-ws"), runs, strict=True)
        ]
        rows.append(
            [
                mode,
                median([r["events_per_s"] for r in runs]),
                median([r["server_cpu_us_per_event"] for r in runs]),
                median([r["client_cpu_pct"] for r in runs]),
                all(r["delivered"] == r["expected"] for r in runs),
                median(ratios) if mode != "prefect-ws" else "",
            ]
        )
    print_table(
        f"Catch-up: {args.clients} clients join a {args.events}-event run with since=0 "
        f"(Redis backend, {client} load client, median of {args.repeats})",
        ["server", "events/s", "server us/ev", "client CPU %", "all delivered", "prefect-ws / it"],
        rows,
    )
    suffix = f"-{args.tag}" if args.tag else ""
    write_results(
        f"catchup{suffix}",
        args.quick,
        {
            "events": args.events,
            "clients": args.clients,
            "repeats": args.repeats,
            "servers": modes,
            "load_client": client,
            "runs": results,
        },
    )


if __name__ == "__main__":
    main()
