"""Fan-out: delivered events/s and latency, 1..1000 clients on one run and 100 runs x 10 clients.

    .venv/bin/python benchmarks/bench_fanout.py [--quick] [--repeats 3] [--loop asyncio|uvloop]
    .venv/bin/python benchmarks/bench_fanout.py --clients none --multi-run 100x10  # that case only
    .venv/bin/python benchmarks/bench_fanout.py --workers 1,2 --clients 1000 --multi-run none

The servers run side by side on one Redis (``prefect-ws``: one backend subscription per run and
a bounded queue per client; ``naive``: one broadcaster subscription and unbounded queue per
client, see ``naive_server.py``; the anchors of ``_anchors.py``: Node's ``ws`` + ``ioredis`` and
python-websockets' ``broadcast()``, one Redis subscription per run each; ``--servers`` picks).
For each client count K and repetition, in alternation:
a publisher process (the real ``Publisher.emit`` path) emits ``run_start``, K clients in separate
processes (``_wsload.py``) connect and get their first frame, then the publisher emits N
``step_log`` events and ``run_complete``. ``flood`` emits as fast as the publisher drains and
measures delivered events/s (first publish -> last frame at the last client); ``paced`` emits
100 events/s and measures publish -> receive latency. Server CPU per delivered event and the
load clients' own CPU (a client process near 100 % of a core sets the number, not the server)
are reported too. Medians over repetitions; ratios = prefect-ws / each other server from the
same repetitions.

``--multi-run RxC`` (default ``100x10``; ``--quick``: 3x2) adds the many-runs case:
C clients on each of R runs, one publisher process emitting to all R runs in round-robin order
(N events per run), clients in one or two processes. Flood as above; paced at 10 events/s per
run. ``--loop`` picks the event loop of both servers (default asyncio).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _anchors import (
    ANCHORS,
    LOAD_CLIENTS,
    anchor_server,
    available_anchors,
    node_version,
    stream_load_client,
)
from _common import (
    HERE,
    PYTHON,
    REDIS_URL,
    add_loop_option,
    cleanup_redis,
    cpu_seconds,
    latency_summary,
    median,
    prefect_ws_server,
    print_table,
    raise_nofile,
    ratio,
    redis_prefix,
    results_dir,
    stop,
    top_frames,
    write_results,
)

MODES = ("prefect-ws", "naive", *ANCHORS)
# (name, case kind, value): the ratios printed for prefect-ws against every other server.
RATIOS: tuple[tuple[str, str, Callable[[dict[str, Any]], float | None]], ...] = (
    ("flood events/s", "flood", lambda r: r["events_per_s"]),
    ("flood us/ev", "flood", lambda r: r["server_cpu_us_per_event"]),
    ("paced p50", "paced", lambda r: r["latency"]["p50_ms"]),
    ("paced p99", "paced", lambda r: r["latency"]["p99_ms"]),
    ("paced us/ev", "paced", lambda r: r["server_cpu_us_per_event"]),
)


def worker_modes(workers: str) -> dict[str, int]:
    """Server label -> worker processes, for each count of ``--workers`` above one.

    ``--workers 1,2`` compares ``prefect-ws`` (one process, always there) with ``prefect-ws x2``
    (two processes on one port, as ``prefect-ws serve --workers 2``)."""
    counts = [int(w) for w in workers.split(",") if w.strip()]
    return {f"prefect-ws x{n}": n for n in counts if n > 1}


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
    runs: int = 1,
    load_client: list[str] | None = None,
) -> dict[str, Any]:
    """One case: ``clients`` clients on each of ``runs`` runs, ``n`` events per run.

    ``rate`` is the publisher's total rate over all runs (0: flood). With ``runs > 1`` one
    publisher process emits to every run in round-robin order, and the clients (1 or 2
    processes, split by run) watch run ids ``uuid.UUID(int=base + i)``. ``load_client``: the
    command of another stream load client (:func:`~_anchors.stream_load_client`) for a flood of
    one run; it records no latencies.
    """
    total = clients * runs
    if runs == 1:
        run_id = str(uuid.uuid4())
        publish = ["--run-id", run_id]
        url = f"ws://127.0.0.1:{port}/api/v2/workflows/runs/{run_id}/stream"
        shares = [(0, total // 2), (0, total - total // 2)] if total >= 500 else [(0, total)]
    else:
        base = uuid.uuid4().int >> 8  # fresh ids per case, far from overflowing 128 bits
        publish = ["--runs", str(runs), "--uuid-base", str(base)]
        url = f"ws://127.0.0.1:{port}/api/v2/workflows/runs/{{uuid}}/stream"
        first_half = runs // 2 if total >= 500 else 0
        shares = [
            (base + start, count * clients)
            for start, count in ((0, first_half), (first_half, runs - first_half))
            if count
        ]
    publisher = subprocess.Popen(
        [PYTHON, str(HERE / "_publish.py"), *publish, "--n", str(n), "--rate", str(rate)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    workers: list[subprocess.Popen[str]] = []
    lat_files: list[Path] = []
    try:
        _read_line(publisher, "STARTED", 60)
        for uuid_base, count in shares:
            lat_file = Path(tempfile.mkstemp(prefix="fanout-lat-")[1])
            lat_files.append(lat_file)
            if load_client is not None and runs == 1 and not rate:
                command = [*load_client, "--mode", "stream", "--url", url, "--count", str(count)]
                command += ["--deadline", str(deadline)]
                workers.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
                continue
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
                        "--per-run",
                        str(clients),
                        "--uuid-base",
                        str(uuid_base),
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
    server_cpu = cpu1 - cpu0
    close_codes: dict[str, int] = {}
    close_reasons: dict[str, str] = {}
    for r in reports:
        for code, count in r["close_codes"].items():
            close_codes[code] = close_codes.get(code, 0) + count
        for code, reason in r.get("close_reasons", {}).items():
            close_reasons.setdefault(code, reason)
    last = max(r["last_recv_ns"] for r in reports)
    seconds = (last - go_ns) / 1e9 if last > go_ns else None
    return {
        "runs": runs,
        "clients": total,
        "clients_per_run": clients,
        "connected": connected,
        "n": n,
        "rate": rate,
        "expected": total * (n + 1),
        "delivered": delivered,
        "complete": sum(r["finished"] for r in reports),
        "out_of_order": sum(r["out_of_order"] for r in reports),
        "close_codes": close_codes,
        "close_reasons": close_reasons,
        "seconds": round(seconds, 3) if seconds else None,
        "events_per_s": round(delivered / seconds, 1) if seconds else None,
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_us_per_event": round(1e6 * server_cpu / delivered, 2) if delivered else None,
        "client_cpu_s": round(sum(r.get("cpu_s", 0.0) for r in reports), 3),
        "client_cpu_pct_max": max(
            (round(100 * r.get("cpu_s", 0.0) / seconds, 1) for r in reports if seconds),
            default=None,
        ),
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


def parse_variants(specs: list[str]) -> dict[str, dict[str, str]]:
    """``["gc-default:BENCH_GC=default"]`` -> ``{"prefect-ws[gc-default]": {"BENCH_GC": ...}}``."""
    variants = {}
    for spec in specs:
        name, _, assignments = spec.partition(":")
        env = dict(pair.split("=", 1) for pair in assignments.split(",") if "=" in pair)
        if not name or not env:
            raise SystemExit(f"--variant {spec!r}: expected NAME:VAR=VALUE[,VAR=VALUE]")
        variants[f"prefect-ws[{name}]"] = env
    return variants


def parse_multi(spec: str) -> list[tuple[int, int]]:
    """``"100x10,10x100"`` -> [(100, 10), (10, 100)] (runs x clients per run); ``none`` -> []."""
    if spec.strip().lower() in ("", "none"):
        return []
    cases = []
    for part in spec.split(","):
        runs, _, clients = part.strip().lower().partition("x")
        cases.append((int(runs), int(clients)))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--clients",
        default="1,10,100,1000",
        help="client counts on one run; 'none' runs only the --multi-run cases",
    )
    parser.add_argument(
        "--multi-run",
        default="100x10",
        help="RUNSxCLIENTS cases, comma-separated (CLIENTS on each of RUNS runs); 'none' skips",
    )
    parser.add_argument(
        "--workers",
        default="1",
        help="prefect-ws worker counts to compare, e.g. 1,2 (each a server of its own)",
    )
    parser.add_argument(
        "--servers",
        default=",".join(MODES),
        help=f"servers to compare, comma-separated from {','.join(MODES)} (prefect-ws always)",
    )
    parser.add_argument(
        "--events", type=int, default=0, help="flood events per run for every case (0: by size)"
    )
    parser.add_argument("--deadline", type=float, default=180.0, help="seconds per case")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="A/B: one more prefect-ws server with these environment variables, e.g. "
        "gc-default:BENCH_GC=default (repeatable; ratios against it come out too)",
    )
    parser.add_argument("--tag", default="", help="suffix for the result file")
    parser.add_argument(
        "--flood-client",
        choices=LOAD_CLIENTS,
        default="python",
        help="load client of the one-run floods: python (_wsload.py, ~6 us CPU per event, "
        "which sets the flood figures on 2 cores) or node (anchors/node/load.js, ~1.3 us; "
        "no latencies). Paced and many-run cases always use the Python one.",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="flood",
        choices=("flood", "paced"),
        help="py-spy each server in the first repetition's cases of this kind (default flood)",
    )
    add_loop_option(parser)
    args = parser.parse_args()
    raise_nofile()
    flood_client = None
    suffix = f"-{args.tag}" if args.tag else ""
    if args.flood_client == "node":
        flood_client = stream_load_client("node")[1]
        suffix += "-node-client"
    if args.loop != "asyncio":
        suffix += f"-{args.loop}"
    single = args.clients.strip().lower() not in ("", "none")
    wanted = [m for m in MODES if m == "prefect-ws" or m in args.servers.split(",")]
    anchors = available_anchors(tuple(m for m in wanted if m in ANCHORS))
    modes = [m for m in wanted if m not in ANCHORS or m in anchors]
    variants = parse_variants(args.variant)
    workers = worker_modes(args.workers)  # "prefect-ws xN" -> N processes on one port
    modes[1:1] = [*workers, *variants]
    if workers:
        suffix += "-workers"

    # Cases: (runs, clients per run, flood events per run, paced events per run, paced rate).
    # One run is paced at 100 events/s; several runs at 10 events/s each (100 runs: 1000/s in
    # all, 10k frames/s at 10 clients per run, as much as one run to 100 clients at 100/s).
    plan: list[tuple[int, int, int, int, float]] = []
    if args.quick:
        if single:
            plan.append((1, 10, 100, 20, 100.0))
        if parse_multi(args.multi_run):
            plan.append((3, 2, 100, 10, 30.0))  # the 100 x 10 case in miniature
        repeats, deadline = 1, 30.0
    else:
        flood_n = {1: 20000, 10: 10000, 100: 2000, 1000: 300}
        if single:
            for k in (int(c) for c in args.clients.split(",")):
                plan.append((1, k, flood_n.get(k, max(200, 200_000 // k)), 200, 100.0))
        for r, c in parse_multi(args.multi_run):
            plan.append((r, c, max(100, min(20000, 300_000 // (r * c))), 30, 10.0 * r))
        repeats, deadline = args.repeats, args.deadline
        if args.events:
            plan = [(r, c, args.events, pn, pr) for r, c, _, pn, pr in plan]

    prefix = redis_prefix("fanout")
    results: list[dict[str, Any]] = []
    try:
        with contextlib.ExitStack() as stack:
            servers = {
                mode: stack.enter_context(
                    anchor_server(mode, REDIS_URL, prefix)
                    if mode in ANCHORS
                    else prefect_ws_server(
                        REDIS_URL,
                        prefix,
                        mode="prefect-ws" if mode in variants or mode in workers else mode,
                        loop=args.loop,
                        extra_env=variants.get(mode),
                        workers=workers.get(mode, 1),
                    )
                )
                for mode in modes
            }
            for repeat in range(repeats):
                for runs, clients, n, paced_n, paced_rate in plan:
                    for kind, rate, count in (("flood", 0.0, n), ("paced", paced_rate, paced_n)):
                        for mode in modes if repeat % 2 == 0 else reversed(modes):
                            proc, port = servers[mode]
                            label = f"K{clients}" if runs == 1 else f"R{runs}xK{clients}"
                            profile = (
                                results_dir() / f"profile-fanout{suffix}-{mode}-{label}.txt"
                                if args.profile == kind and repeat == 0
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
                                runs=runs,
                                load_client=flood_client,
                            )
                            if profile is not None and profile.exists():
                                result["profile_top"] = top_frames(profile)
                                print(f"  py-spy top self time: {result['profile_top'][:6]}")
                            result.update(mode=mode, kind=kind, repeat=repeat)
                            results.append(result)
                            print(
                                f"{mode:>10} {kind:>5} runs={runs:<4} K={clients:<5} "
                                f"n={count:<6} {result['delivered']}/{result['expected']} "
                                f"{result['events_per_s']} ev/s {result['latency']} "
                                f"server {result['server_cpu_us_per_event']} us/ev, "
                                f"client CPU max {result['client_cpu_pct_max']} %",
                                flush=True,
                            )
    finally:
        cleanup_redis(prefix)

    summary = []
    for runs, clients, n, paced_n, paced_rate in plan:

        def select(mode: str, kind: str, runs: int = runs, k: int = clients) -> list[Any]:
            return [
                r
                for r in results
                if r["mode"] == mode
                and r["kind"] == kind
                and r["runs"] == runs
                and r["clients_per_run"] == k
            ]

        row: dict[str, Any] = {
            "case": f"{runs} x {clients}",
            "runs": runs,
            "clients_per_run": clients,
            "clients": runs * clients,
            "flood_n_per_run": n,
            "paced_n_per_run": paced_n,
            "paced_rate_per_run": paced_rate / runs,
        }
        for mode in modes:
            flood, paced = select(mode, "flood"), select(mode, "paced")
            row[mode] = {
                "flood_events_per_s": median([r["events_per_s"] for r in flood]),
                "flood_p50_ms": median([r["latency"]["p50_ms"] for r in flood]),
                "flood_p99_ms": median([r["latency"]["p99_ms"] for r in flood]),
                "paced_p50_ms": median([r["latency"]["p50_ms"] for r in paced]),
                "paced_p99_ms": median([r["latency"]["p99_ms"] for r in paced]),
                "all_delivered": all(r["delivered"] == r["expected"] for r in flood + paced),
                "server_cpu_s": median([r["server_cpu_s"] for r in flood]),
                "flood_us_per_event": median([r["server_cpu_us_per_event"] for r in flood]),
                "paced_us_per_event": median([r["server_cpu_us_per_event"] for r in paced]),
                "client_cpu_pct_max": median([r["client_cpu_pct_max"] for r in flood]),
            }
        # prefect-ws / the other server, per repetition (same load, same minute), then medians.
        row["ratios"] = {
            other: {
                name: median(
                    [
                        ratio(get(a), get(b))
                        for a, b in zip(
                            select("prefect-ws", kind), select(other, kind), strict=False
                        )
                    ]
                )
                for name, kind, get in RATIOS
            }
            for other in modes
            if other != "prefect-ws"
        }

        def flood_ratio(mode: str, other: str) -> float | None:
            """Median over repetitions of mode's flood events/s over other's, same repetition."""
            pairs = zip(select(mode, "flood"), select(other, "flood"), strict=False)
            return median([ratio(a["events_per_s"], b["events_per_s"]) for a, b in pairs])

        for mode in workers:
            row[mode]["ratio_vs_one_process"] = flood_ratio(mode, "prefect-ws")
            if "naive" in modes:
                row[mode]["ratio_vs_naive"] = flood_ratio(mode, "naive")
        summary.append(row)

    print_table(
        f"Fan-out, Redis backend, {args.loop} loop (median of {repeats}; runs x clients per run; "
        "paced: 100 ev/s on one run, 10 ev/s per run on several; CPU per delivered event)",
        [
            "runs x clients",
            "server",
            "flood events/s",
            "flood us/ev",
            "flood p99 ms",
            "paced p50 ms",
            "paced p99 ms",
            "paced us/ev",
            "client CPU %",
            "all delivered",
        ],
        [
            [
                row["case"],
                mode,
                row[mode]["flood_events_per_s"],
                row[mode]["flood_us_per_event"],
                row[mode]["flood_p99_ms"],
                row[mode]["paced_p50_ms"],
                row[mode]["paced_p99_ms"],
                row[mode]["paced_us_per_event"],
                row[mode]["client_cpu_pct_max"],
                row[mode]["all_delivered"],
            ]
            for row in summary
            for mode in modes
        ],
    )
    print_table(
        "prefect-ws / other server, same repetitions (events/s: > 1 is better; the rest: < 1)",
        ["runs x clients", "vs", *(name for name, _, _ in RATIOS)],
        [
            [row["case"], other, *(row["ratios"][other][name] for name, _, _ in RATIOS)]
            for row in summary
            for other in row["ratios"]
        ],
    )
    if workers:
        print_table(
            "prefect-ws with N worker processes on one port / one process (flood events/s)",
            ["runs x clients", "server", "vs 1 process", "vs naive"],
            [
                [
                    row["case"],
                    mode,
                    row[mode]["ratio_vs_one_process"],
                    row[mode].get("ratio_vs_naive"),
                ]
                for row in summary
                for mode in workers
            ],
        )
    write_results(
        f"fanout{suffix}",
        args.quick,
        {
            "loop": args.loop,
            "servers": modes,
            "workers": {"prefect-ws": 1, **workers},
            "flood_client": args.flood_client,
            "node": node_version() if "node-ws" in modes else None,
            "plan": [
                {
                    "runs": r,
                    "clients_per_run": c,
                    "flood_n_per_run": n,
                    "paced_n_per_run": pn,
                    "paced_rate_total": pr,
                }
                for r, c, n, pn, pr in plan
            ],
            "repeats": repeats,
            "summary": summary,
            "runs": results,
        },
    )


if __name__ == "__main__":
    main()
