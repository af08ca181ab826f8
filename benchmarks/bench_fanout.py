"""Fan-out: delivered events/s and latency for 1..1000 clients on one run, prefect-ws vs naive.

    .venv/bin/python benchmarks/bench_fanout.py [--quick] [--repeats 3]

Both servers run side by side on the Redis backend (``prefect-ws``: one backend subscription per
run and a bounded queue per client; ``naive``: one broadcaster subscription and unbounded queue
per client, see ``naive_server.py``). For each client count K and repetition, in alternation:
a publisher process (the real ``Publisher.emit`` path) emits ``run_start``, K clients in separate
processes (``_wsload.py``) connect and get their first frame, then the publisher emits N
``step_log`` events and ``run_complete``. ``flood`` emits as fast as the publisher drains and
measures delivered events/s (first publish -> last frame at the last client); ``paced`` emits
100 events/s and measures publish -> receive latency. Medians over repetitions; ratio =
prefect-ws / naive from the same repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from array import array
from pathlib import Path
from typing import Any

from _common import (
    HERE,
    PYTHON,
    REDIS_URL,
    RESULTS,
    cleanup_redis,
    cpu_seconds,
    latency_summary,
    median,
    prefect_ws_server,
    print_table,
    raise_nofile,
    ratio,
    redis_prefix,
    stop,
    top_frames,
    write_results,
)

MODES = ("prefect-ws", "naive")


def _read_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    """Next stdout line starting with ``prefix`` (bounded by ``timeout`` via the deadline loop)."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args!r} exited ({proc.poll()}) before printing {prefix}")
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"no {prefix} line within {timeout} s")


def publisher_env(prefix: str) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_WS_BROADCAST_URL": REDIS_URL,
        "PREFECT_WS_REDIS_PREFIX": prefix,
        "PREFECT_WS_PUBLISHER_BUFFER_SIZE": "1000000",
    }


def run_case(
    port: int,
    server_pid: int,
    clients: int,
    n: int,
    rate: float,
    deadline: float,
    env: dict[str, str],
    profile: Path | None = None,
) -> dict[str, Any]:
    run_id = str(uuid.uuid4())
    url = f"ws://127.0.0.1:{port}/api/v2/workflows/runs/{run_id}/stream"
    publisher = subprocess.Popen(
        [PYTHON, str(HERE / "_publish.py"), "--run-id", run_id, "--n", str(n), "--rate", str(rate)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    workers: list[subprocess.Popen[str]] = []
    lat_files: list[Path] = []
    try:
        _read_line(publisher, "STARTED", 60)
        per_process = [clients // 2, clients - clients // 2] if clients >= 500 else [clients]
        for count in per_process:
            lat_file = Path(tempfile.mkstemp(prefix="fanout-lat-")[1])
            lat_files.append(lat_file)
            workers.append(
                subprocess.Popen(
                    [
                        PYTHON,
                        str(HERE / "_wsload.py"),
                        "--mode",
                        "stream",
                        "--url",
                        url,
                        "--count",
                        str(count),
                        "--deadline",
                        str(deadline),
                        "--lat-out",
                        str(lat_file),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        # Connections are opened only after the publisher stored run_start, so every client's
        # first frame is run_start (from history; naive: its ready frame).
        ready = [_read_line(w, "READY", 120).split() for w in workers]
        connected = sum(int(r[1]) for r in ready)
        spy = start_profile(server_pid, profile) if profile else None
        cpu0 = cpu_seconds(server_pid)
        go_ns = time.time_ns()
        assert publisher.stdin is not None
        publisher.stdin.write("go\n")
        publisher.stdin.flush()
        reports = []
        for worker in workers:
            out, _ = worker.communicate(timeout=deadline + 60)
            reports.append(json.loads(out.strip().splitlines()[-1]))
        cpu1 = cpu_seconds(server_pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
            spy.wait(30)
        pub_out, _ = publisher.communicate(timeout=60)
        pub_report = json.loads(pub_out.strip().splitlines()[-1])
        latencies = array("q")
        for lat_file in lat_files:
            latencies.frombytes(lat_file.read_bytes())
    finally:
        for proc in [publisher, *workers]:
            stop(proc)
        for lat_file in lat_files:
            lat_file.unlink(missing_ok=True)
    delivered = sum(r["delivered"] for r in reports)
    close_codes: dict[str, int] = {}
    for r in reports:
        for code, count in r["close_codes"].items():
            close_codes[code] = close_codes.get(code, 0) + count
    last = max(r["last_recv_ns"] for r in reports)
    seconds = (last - go_ns) / 1e9 if last > go_ns else None
    return {
        "clients": clients,
        "connected": connected,
        "n": n,
        "rate": rate,
        "expected": clients * (n + 1),
        "delivered": delivered,
        "complete": sum(r["finished"] for r in reports),
        "out_of_order": sum(r["out_of_order"] for r in reports),
        "close_codes": close_codes,
        "seconds": round(seconds, 3) if seconds else None,
        "events_per_s": round(delivered / seconds, 1) if seconds else None,
        "server_cpu_s": round(cpu1 - cpu0, 2),
        "latency": latency_summary(latencies),
        "publisher": pub_report,
    }


def start_profile(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy (the ``bench`` extra) sampling the server while the case runs."""
    spy = shutil.which("py-spy", path=str(Path(PYTHON).parent)) or shutil.which("py-spy")
    if spy is None:
        print("py-spy not installed (pip install -e '.[bench]'): no profile", flush=True)
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", default="1,10,100,1000")
    parser.add_argument("--tag", default="", help="suffix for the result file, e.g. patched")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy each server in the first flood cases"
    )
    args = parser.parse_args()
    raise_nofile()
    suffix = f"-{args.tag}" if args.tag else ""

    if args.quick:
        plan = {10: 100}
        repeats, paced_n, deadline = 1, 20, 30.0
    else:
        counts = [int(c) for c in args.clients.split(",")]
        flood_n = {1: 20000, 10: 10000, 100: 2000, 1000: 300}
        plan = {k: flood_n.get(k, max(200, 200_000 // k)) for k in counts}
        repeats, paced_n, deadline = args.repeats, 200, 180.0

    prefix = redis_prefix("fanout")
    runs: list[dict[str, Any]] = []
    try:
        with contextlib.ExitStack() as stack:
            servers = {
                mode: stack.enter_context(prefect_ws_server(REDIS_URL, prefix, mode=mode))
                for mode in MODES
            }
            for repeat in range(repeats):
                for clients, n in plan.items():
                    for kind, rate, count in (("flood", 0.0, n), ("paced", 100.0, paced_n)):
                        for mode in MODES if repeat % 2 == 0 else reversed(MODES):
                            proc, port = servers[mode]
                            profile = (
                                RESULTS / f"profile-fanout{suffix}-{mode}-K{clients}.txt"
                                if args.profile and repeat == 0 and kind == "flood"
                                else None
                            )
                            result = run_case(
                                port,
                                proc.pid,
                                clients,
                                count,
                                rate,
                                deadline,
                                publisher_env(prefix),
                                profile,
                            )
                            if profile is not None and profile.exists():
                                result["profile_top"] = top_frames(profile)
                                print(f"  py-spy top self time: {result['profile_top'][:6]}")
                            result.update(mode=mode, kind=kind, repeat=repeat)
                            runs.append(result)
                            print(
                                f"{mode:>10} {kind:>5} K={clients:<5} n={count:<6} "
                                f"{result['delivered']}/{result['expected']} "
                                f"{result['events_per_s']} ev/s {result['latency']}",
                                flush=True,
                            )
    finally:
        cleanup_redis(prefix)

    summary = []
    for clients in plan:
        row: dict[str, Any] = {"clients": clients}
        for mode in MODES:
            flood = [
                r
                for r in runs
                if r["mode"] == mode and r["kind"] == "flood" and r["clients"] == clients
            ]
            paced = [
                r
                for r in runs
                if r["mode"] == mode and r["kind"] == "paced" and r["clients"] == clients
            ]
            row[mode] = {
                "flood_events_per_s": median([r["events_per_s"] for r in flood]),
                "flood_p50_ms": median([r["latency"]["p50_ms"] for r in flood]),
                "flood_p99_ms": median([r["latency"]["p99_ms"] for r in flood]),
                "paced_p50_ms": median([r["latency"]["p50_ms"] for r in paced]),
                "paced_p99_ms": median([r["latency"]["p99_ms"] for r in paced]),
                "all_delivered": all(r["delivered"] == r["expected"] for r in flood + paced),
                "server_cpu_s": median([r["server_cpu_s"] for r in flood]),
            }
        ratios = [
            ratio(a["events_per_s"], b["events_per_s"])
            for a, b in zip(
                [
                    r
                    for r in runs
                    if r["mode"] == "prefect-ws"
                    and r["kind"] == "flood"
                    and r["clients"] == clients
                ],
                [
                    r
                    for r in runs
                    if r["mode"] == "naive" and r["kind"] == "flood" and r["clients"] == clients
                ],
                strict=False,
            )
        ]
        row["throughput_ratio"] = median(ratios)
        summary.append(row)

    print_table(
        f"Fan-out, one run, Redis backend (median of {repeats})",
        [
            "clients",
            "server",
            "flood events/s",
            "flood p50 ms",
            "flood p99 ms",
            "100/s p50 ms",
            "100/s p99 ms",
            "all delivered",
            "ratio vs naive",
        ],
        [
            [
                row["clients"],
                mode,
                row[mode]["flood_events_per_s"],
                row[mode]["flood_p50_ms"],
                row[mode]["flood_p99_ms"],
                row[mode]["paced_p50_ms"],
                row[mode]["paced_p99_ms"],
                row[mode]["all_delivered"],
                row["throughput_ratio"] if mode == "prefect-ws" else "",
            ]
            for row in summary
            for mode in MODES
        ],
    )
    write_results(
        f"fanout{suffix}",
        args.quick,
        {"plan": plan, "repeats": repeats, "summary": summary, "runs": runs},
    )


if __name__ == "__main__":
    main()
