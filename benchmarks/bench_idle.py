"""Idle connections: RSS per connection, handshakes/s and idle CPU for 1k/5k/10k clients.

    .venv/bin/python benchmarks/bench_idle.py [--quick] [--counts 1000,5000,10000] [--loop uvloop]

One server process at a time (Redis backend): ``prefect-ws`` as ``prefect-ws serve`` runs it
(websockets-sansio, permessage-deflate off) vs the same app under uvicorn's defaults (``ws=auto``,
deflate on) and the anchors of ``_anchors.py`` (Node ``ws`` + ``ioredis``, python-websockets;
``--servers`` picks). The load clients' own CPU for the handshakes is reported.
Clients (``_wsload.py --mode idle``, up to 5000 per process) offer permessage-deflate
as browsers do, and each watches a run of its own: the worst case, one backend subscription and
one run channel per connection. Counts are cumulative; RSS is read from /proc after a settle
time, idle CPU over a quiet window. ``--loop`` picks both servers' event loop (default asyncio).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from typing import Any

from _anchors import ANCHORS, anchor_server, available_anchors
from _common import (
    HERE,
    PYTHON,
    REDIS_URL,
    add_loop_option,
    cleanup_redis,
    cpu_seconds,
    median,
    prefect_ws_server,
    print_table,
    raise_nofile,
    ratio,
    redis_prefix,
    rss_kb,
    stop,
    write_results,
)

PER_PROCESS = 5000
MODES = ("prefect-ws", "uvicorn-defaults", *ANCHORS)


def measure_mode(
    mode: str, counts: list[int], settle: float, window: float, loop: str = "asyncio"
) -> list[dict[str, Any]]:
    prefix = redis_prefix("idle")
    results = []
    clients: list[subprocess.Popen[str]] = []
    try:
        server_cm = (
            anchor_server(mode, REDIS_URL, prefix)
            if mode in ANCHORS
            else prefect_ws_server(REDIS_URL, prefix, mode=mode, loop=loop)
        )
        with server_cm as (server, port):
            time.sleep(1.0)
            baseline = rss_kb(server.pid)
            held = 0
            # wait=: the run has not started yet (without it a newer server closes with 4404).
            url = f"ws://127.0.0.1:{port}/api/v2/workflows/runs/{{uuid}}/stream?wait=3600"
            for target in counts:
                batch, opened, failed, seconds, client_cpu = [], 0, 0, 0.0, 0.0
                started = time.perf_counter()
                while held + sum(n for _, n in batch) < target:
                    count = min(PER_PROCESS, target - held - sum(n for _, n in batch))
                    proc = subprocess.Popen(
                        [
                            PYTHON,
                            str(HERE / "_wsload.py"),
                            "--mode",
                            "idle",
                            "--url",
                            url,
                            "--count",
                            str(count),
                            "--deflate",
                            "--deadline",
                            "900",
                            "--uuid-base",
                            str(1 + held + sum(n for _, n in batch)),
                        ],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    batch.append((proc, count))
                for proc, _ in batch:
                    assert proc.stdout is not None
                    line = proc.stdout.readline().split()
                    if not line or line[0] != "READY":
                        raise RuntimeError(f"idle client failed: {line}")
                    opened += int(line[1])
                    failed += int(line[2])
                    client_cpu += float(line[4]) if len(line) > 4 else 0.0
                seconds = time.perf_counter() - started
                clients += [p for p, _ in batch]
                held += opened
                time.sleep(settle)
                cpu0 = cpu_seconds(server.pid)
                time.sleep(window)
                cpu1 = cpu_seconds(server.pid)
                rss = rss_kb(server.pid)
                still_open = 0
                for proc in clients:
                    assert proc.stdin is not None and proc.stdout is not None
                    proc.stdin.write("status\n")
                    proc.stdin.flush()
                    still_open += int(proc.stdout.readline().split()[1])
                result = {
                    "mode": mode,
                    "target": target,
                    "handshakes": held,
                    "held": still_open,
                    "failed": failed,
                    "handshakes_per_s": round(opened / seconds, 1) if seconds else None,
                    "client_cpu_pct": round(100 * client_cpu / seconds, 1) if seconds else None,
                    "server_rss_mb": round(rss / 1024, 1),
                    "baseline_rss_mb": round(baseline / 1024, 1),
                    "kb_per_conn": round((rss - baseline) / max(1, still_open), 1),
                    "idle_cpu_pct": round(100 * (cpu1 - cpu0) / window, 1),
                }
                results.append(result)
                print(result, flush=True)
    finally:
        for proc in clients:
            if proc.stdin is not None and proc.poll() is None:
                try:
                    proc.stdin.write("close\n")
                    proc.stdin.flush()
                except OSError:
                    pass
        for proc in clients:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                stop(proc)
        cleanup_redis(prefix)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--counts", default="1000,5000,10000")
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument(
        "--servers",
        default=",".join(MODES),
        help=f"servers to compare, comma-separated from {','.join(MODES)} (prefect-ws always)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="repetitions, the servers in rotating order; medians and per-repetition ratios",
    )
    add_loop_option(parser)
    args = parser.parse_args()
    wanted = [m for m in MODES if m == "prefect-ws" or m in args.servers.split(",")]
    anchors = available_anchors(tuple(m for m in wanted if m in ANCHORS))
    modes = [m for m in wanted if m not in ANCHORS or m in anchors]
    counts = [int(c) for c in args.counts.split(",")]
    if args.quick:
        counts, args.settle, args.window = [100], 0.3, 0.5
    raise_nofile()

    results = []
    for repetition in range(args.repeats):
        shift = repetition % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            for result in measure_mode(mode, counts, args.settle, args.window, args.loop):
                results.append({**result, "repetition": repetition})

    def medians(mode: str, target: int, key: str) -> Any:
        return median([r[key] for r in results if r["mode"] == mode and r["target"] == target])

    def ratios(mode: str, target: int, key: str) -> Any:
        """prefect-ws / ``mode``, the median of the repetitions' ratios."""
        per_repetition = []
        for repetition in range(args.repeats):
            pair = {
                r["mode"]: r[key]
                for r in results
                if r["repetition"] == repetition and r["target"] == target
            }
            if mode in pair and "prefect-ws" in pair:
                per_repetition.append(ratio(pair["prefect-ws"], pair[mode]))
        return median(per_repetition)

    keys = (
        *("held", "failed", "handshakes_per_s", "client_cpu_pct", "server_rss_mb"),
        *("kb_per_conn", "idle_cpu_pct"),
    )
    rows = []
    for target in counts:
        for mode in modes:
            ours = mode == "prefect-ws"
            rows.append(
                [
                    target,
                    mode,
                    *(medians(mode, target, key) for key in keys),
                    "" if ours else ratios(mode, target, "kb_per_conn"),
                    "" if ours else ratios(mode, target, "handshakes_per_s"),
                ]
            )
    print_table(
        f"Idle connections, one server process, a run per connection (Redis backend, "
        f"{args.loop} loop; median of {args.repeats}; ratios: prefect-ws / that server, the "
        "median of the repetitions' ratios)",
        [
            "target",
            "server",
            "held",
            "failed",
            "handshakes/s",
            "client CPU %",
            "RSS MB",
            "KB/conn",
            "idle CPU %",
            "KB/conn ratio",
            "handshakes/s ratio",
        ],
        rows,
    )
    name = "idle" if args.loop == "asyncio" else f"idle-{args.loop}"
    write_results(
        name,
        args.quick,
        {
            "loop": args.loop,
            "servers": modes,
            "counts": counts,
            "repeats": args.repeats,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
