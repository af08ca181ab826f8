"""Soak: connect/disconnect cycles and a long event stream through one server; RSS over time.

    .venv/bin/python benchmarks/bench_soak.py [--quick] [--cycles 50000] [--events 100000]
    .venv/bin/python benchmarks/bench_soak.py --loop uvloop  # both phases on uvloop

One prefect-ws server (Redis backend). After a warm-up (1000 cycles, a short stream) its RSS is
the baseline; then ``--cycles`` connect / first frame / close cycles on one open run, then
``--events`` events streamed to ``--clients`` (10) clients on another run, then ``--cycles``
cycles again. RSS after each phase; growth past the warm-up is what a leak would show.

The full default run is **100k connect/disconnect cycles** in total, as two
phases of 50,000 (before and after the stream), and **1M events** through the server, counted
as delivered frames: 100,000 published events x 10 clients = 1,000,010 frames (with
``run_complete``). That takes several minutes here (cycles ran at 570-770/s); ``--quick`` is
tiny.
"""

from __future__ import annotations

import argparse
import subprocess
import uuid
from typing import Any

from _common import (
    HERE,
    PYTHON,
    REDIS_URL,
    add_loop_option,
    cleanup_redis,
    prefect_ws_server,
    print_table,
    raise_nofile,
    redis_prefix,
    rss_kb,
    write_results,
)
from bench_fanout import publisher_env, run_case


def open_run(prefix: str) -> str:
    """A run with ``run_start`` stored and no end: every connection gets one frame and stays."""
    run_id = str(uuid.uuid4())
    subprocess.run(
        [
            PYTHON,
            str(HERE / "_publish.py"),
            "--run-id",
            run_id,
            "--n",
            "0",
            "--no-wait",
            "--no-complete",
        ],
        env=publisher_env(prefix),
        stdout=subprocess.DEVNULL,
        check=True,
        timeout=60,
    )
    return run_id


def cycles(port: int, run_id: str, count: int, deadline: float) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}/api/v2/workflows/runs/{run_id}/stream"
    out = subprocess.run(
        [
            PYTHON,
            str(HERE / "_wsload.py"),
            "--mode",
            "cycle",
            "--url",
            url,
            "--count",
            str(count),
            "--concurrency",
            "50",
            "--deadline",
            str(deadline),
        ],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        timeout=deadline + 60,
    )
    import json

    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument(
        "--cycles",
        type=int,
        default=50_000,
        help="cycles per phase; two phases, so 2 x 50,000 = 100k by default",
    )
    parser.add_argument(
        "--events",
        type=int,
        default=100_000,
        help="events published on one run; each client gets all (x 10 clients = 1M frames)",
    )
    parser.add_argument("--clients", type=int, default=10)
    add_loop_option(parser)
    args = parser.parse_args()
    warm_cycles, warm_events = 1000, 2000
    if args.quick:
        args.cycles, args.events, warm_cycles, warm_events = 200, 500, 50, 100
    raise_nofile()

    prefix = redis_prefix("soak")
    phases: list[dict[str, Any]] = []
    try:
        with prefect_ws_server(REDIS_URL, prefix, loop=args.loop) as (server, port):
            env = publisher_env(prefix)
            run_id = open_run(prefix)

            def record(name: str, detail: dict[str, Any]) -> None:
                phase = {"phase": name, "rss_mb": round(rss_kb(server.pid) / 1024, 1), **detail}
                phases.append(phase)
                print(phase, flush=True)

            record("start", {})
            cycles(port, run_id, warm_cycles, 120)
            run_case(port, server.pid, args.clients, warm_events, 0.0, 120, env)
            record("after warm-up", {})
            for name in ("cycles", "events", "cycles again"):
                if name == "events":
                    result = run_case(port, server.pid, args.clients, args.events, 0.0, 600, env)
                    detail = {
                        "frames": result["delivered"],
                        "expected": result["expected"],
                        "events_per_s": result["events_per_s"],
                        "close_codes": result["close_codes"],
                    }
                else:
                    result = cycles(port, run_id, args.cycles, 900)
                    detail = {k: result[k] for k in ("cycles", "failures", "per_s")}
                record(name, detail)
    finally:
        cleanup_redis(prefix)

    base = next(p["rss_mb"] for p in phases if p["phase"] == "after warm-up")
    total_cycles = 2 * args.cycles
    frames = args.clients * (args.events + 1)
    print_table(
        f"Soak ({args.loop} loop): {total_cycles} connect/disconnect cycles (2 x {args.cycles}), "
        f"{args.events} events x {args.clients} clients = {frames} frames",
        ["phase", "RSS MB", "growth since warm-up MB", "work", "rate /s"],
        [
            [
                p["phase"],
                p["rss_mb"],
                round(p["rss_mb"] - base, 1),
                f"{p['cycles']} cycles, {p['failures']} failed"
                if "cycles" in p
                else f"{p['frames']}/{p['expected']} frames"
                if "frames" in p
                else "",
                p.get("per_s") or p.get("events_per_s"),
            ]
            for p in phases
        ],
    )
    write_results(
        "soak" if args.loop == "asyncio" else f"soak-{args.loop}",
        args.quick,
        {
            "loop": args.loop,
            "cycles": args.cycles,
            "cycle_phases": 2,
            "total_cycles": total_cycles,
            "events": args.events,
            "clients": args.clients,
            "frames_expected": frames,
            "phases": phases,
        },
    )


if __name__ == "__main__":
    main()
