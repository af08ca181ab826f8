"""Flow overhead: what prefect-ws costs the flow it streams.

    .venv/bin/python benchmarks/bench_overhead.py [--quick] [--repeats 5]

1. us per ``logger.info`` call on the task thread: inside one task, blocks of calls alternate
   between our handler attached and detached (``_flows.log_calls``); the difference of the
   medians is what prefect-ws adds (Prefect's own console and API handlers stay on both sides;
   the console goes to /dev/null). The publisher thread runs meanwhile, so its GIL share counts.
2. A 200-step DAG (layers of 20, each layer waits for the previous) with 10 log lines per step,
   streaming on (``prefect_ws`` decorators, Redis backend) vs off (Prefect's decorators), each
   run in a fresh process, alternating on/off; the flow's wall time excludes start-up/imports
   but includes the final flush of prefect-ws' events. Two more sides separate the costs:
   ``on_memory`` (prefect-ws on, ``memory://`` backend: everything but the Redis round trips)
   and ``noop_hooks`` (Prefect's decorators with hooks that do nothing: Prefect's own price for
   running any state hook). Each run also reports its process CPU time and, with prefect-ws on,
   how many round trips (batches) carried its events. ``attributed`` runs the "on" side with
   prefect-ws' entry points timed on their threads (``_run_flow.py``, ``BENCH_ATTRIBUTE``): its
   share of the process's CPU is what prefect-ws' own code costs, without the spread of a
   difference between two processes.
3. ``hooks``: CPU us per task run of Prefect's ``call_hooks`` (on_running + on_completion) with
   no hooks, prefect-ws' hooks and no-op hooks, on the task thread (``_flows.hook_cost``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from typing import Any

from _common import (
    HERE,
    PYTHON,
    REDIS_URL,
    cleanup_redis,
    median,
    prefect_server,
    print_table,
    ratio,
    redis_prefix,
    with_bench_path,
    write_results,
)


def run_flow(
    name: str, params: dict[str, Any], env: dict[str, str], timeout: float
) -> dict[str, Any]:
    out = subprocess.run(
        [PYTHON, str(HERE / "_run_flow.py"), name, "-", json.dumps(params)],
        env=with_bench_path({**os.environ, **env}),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        timeout=timeout,
        check=True,
    )
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if report["state"] != "COMPLETED":
        raise RuntimeError(f"{name} ended {report['state']}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lines", type=int, default=10)
    parser.add_argument("--parts", default="calls,dag,hooks", help="which parts to run")
    parser.add_argument(
        "--modes",
        default="on,off,attributed,noop_hooks,on_memory",
        help="DAG sides to run (on and off always run): more repeats in the same time",
    )
    parser.add_argument("--tag", default="", help="suffix for the result file")
    parser.add_argument("--prefect-api-url", default="", help="use this running Prefect server")
    parser.add_argument(
        "--other",
        default="",
        metavar="PATH",
        help="DAG: also run the 'on' side with prefect_ws imported from PATH (another version)",
    )
    args = parser.parse_args()
    calls = {"blocks": 20, "per_block": 2000}
    hook_calls = {"calls": 300, "blocks": 5}
    if args.quick:
        args.repeats, args.steps, args.lines = 1, 10, 2
        calls = {"blocks": 4, "per_block": 200}
        hook_calls = {"calls": 20, "blocks": 2}

    prefix = redis_prefix("overhead")
    ws_env = {"PREFECT_WS_BROADCAST_URL": REDIS_URL, "PREFECT_WS_REDIS_PREFIX": prefix}
    per_call: list[dict[str, Any]] = []
    hooks: list[dict[str, Any]] = []
    dag: list[dict[str, Any]] = []
    try:
        with prefect_server(args.prefect_api_url or None) as prefect_env:
            # Prefect's defaults on both sides: its API log handler stays on.
            common = {**prefect_env, "PREFECT_LOGGING_TO_API_ENABLED": "true"}
            on = {**common, **ws_env, "BENCH_STREAMING": "on"}
            off = {**common, "BENCH_STREAMING": "off"}
            noop = {**common, "BENCH_STREAMING": "noop-hooks"}
            on_memory = {**on, "PREFECT_WS_BROADCAST_URL": "memory://"}
            attributed = {**on, "BENCH_ATTRIBUTE": "1"}
            for repeat in range(args.repeats):
                if "calls" in args.parts:
                    result = run_flow("log_call_flow", calls, on, 300)["result"]
                    per_call.append(result)
                    print(f"per call: {result}", flush=True)
                if "hooks" in args.parts:
                    result = run_flow("hook_cost_flow", hook_calls, on, 300)["result"]
                    hooks.append(result)
                    print(f"hooks: {result}", flush=True)
                if "dag" not in args.parts:
                    continue
                params = {"steps": args.steps, "lines": args.lines}
                sides = {
                    "on": on,
                    "off": off,
                    "attributed": attributed,
                    "noop_hooks": noop,
                    "on_memory": on_memory,
                }
                wanted = {"on", "off", *args.modes.split(",")}
                modes = [(label, env) for label, env in sides.items() if label in wanted]
                if args.other:
                    modes.append(("on_other", {**on, "PYTHONPATH": args.other}))
                shift = repeat % len(modes)
                pair: dict[str, Any] = {}
                for label, env in modes[shift:] + modes[:shift]:  # rotate who goes first
                    report = run_flow("dag_flow", params, env, 600)
                    pair[label] = report["seconds"]
                    pair[f"{label}_cpu"] = report["cpu_seconds"]
                    if "batches" in report:
                        pair[f"{label}_batches"] = report["batches"]
                        pair[f"{label}_publisher_cpu"] = report.get("publisher_cpu_seconds")
                    if "entry_cpu_seconds" in report:
                        ours = report["entry_cpu_seconds"] + report["publisher_cpu_seconds"]
                        pair["attributed_pct"] = round(ours / report["cpu_seconds"] * 100, 2)
                        pair["attributed_entry_cpu"] = report["entry_cpu_seconds"]
                        pair["attributed_by_entry"] = report["entry_cpu_by_name"]
                pair["ratio"] = ratio(pair["on"], pair["off"])
                pair["noop_ratio"] = ratio(pair.get("noop_hooks"), pair["off"])
                pair["noop_cpu_ratio"] = ratio(pair.get("noop_hooks_cpu"), pair["off_cpu"])
                pair["memory_ratio"] = ratio(pair.get("on_memory"), pair["off"])
                pair["cpu_ratio"] = ratio(pair["on_cpu"], pair["off_cpu"])
                if args.other:
                    pair["other_ratio"] = ratio(pair["on_other"], pair["off"])
                    pair["other_cpu_ratio"] = ratio(pair["on_other_cpu"], pair["off_cpu"])
                dag.append(pair)
                print(f"dag: {pair}", flush=True)
    finally:
        cleanup_redis(prefix)

    added = median([r["added_us"] for r in per_call])
    summary = {
        "per_call_with_us": median([r["with_us"] for r in per_call]),
        "per_call_without_us": median([r["without_us"] for r in per_call]),
        "per_call_added_us": added,
        "handler_us": median([r["handler_us"] for r in per_call]),
        "dag_on_s": median([p["on"] for p in dag]),
        "dag_off_s": median([p["off"] for p in dag]),
        "dag_paired_ratio": median([p["ratio"] for p in dag]),
        "dag_noop_hooks_s": median([p.get("noop_hooks") for p in dag]),
        "dag_noop_hooks_ratio": median([p["noop_ratio"] for p in dag]),
        "dag_noop_hooks_cpu_ratio": median([p["noop_cpu_ratio"] for p in dag]),
        "dag_on_memory_s": median([p.get("on_memory") for p in dag]),
        "dag_on_memory_ratio": median([p["memory_ratio"] for p in dag]),
        "dag_on_cpu_s": median([p["on_cpu"] for p in dag]),
        "dag_off_cpu_s": median([p["off_cpu"] for p in dag]),
        "dag_cpu_ratio": median([p["cpu_ratio"] for p in dag]),
        "dag_on_batches": median([p.get("on_batches") for p in dag]),
        "dag_on_publisher_cpu_s": median([p.get("on_publisher_cpu") for p in dag]),
        "dag_on_other_s": median([p.get("on_other") for p in dag]),
        "dag_other_ratio": median([p.get("other_ratio") for p in dag]),
        "dag_other_cpu_ratio": median([p.get("other_cpu_ratio") for p in dag]),
        "dag_other_batches": median([p.get("on_other_batches") for p in dag]),
        "dag_other_publisher_cpu_s": median([p.get("on_other_publisher_cpu") for p in dag]),
        "dag_attributed_pct": median([p.get("attributed_pct") for p in dag]),
        "dag_attributed_entry_cpu_s": median([p.get("attributed_entry_cpu") for p in dag]),
        "dag_attributed_publisher_cpu_s": median([p.get("attributed_publisher_cpu") for p in dag]),
        "hooks_none_us": median([h["none_us"] for h in hooks]),
        "hooks_ours_us": median([h["ours_us"] for h in hooks]),
        "hooks_noop_us": median([h["noop_us"] for h in hooks]),
    }
    # The target is a share of the flow process's CPU (all threads): the steadier measure.
    overhead_pct = (
        round((summary["dag_cpu_ratio"] - 1) * 100, 1) if summary["dag_cpu_ratio"] else None
    )
    summary["dag_overhead_pct"] = overhead_pct
    print_table(
        f"Per logger.info call on the task thread (median of {args.repeats} processes)",
        [
            "logger.info, all handlers us",
            "same, ours detached us",
            "difference us",
            "our handler alone us",
            "target us",
        ],
        [
            [
                summary["per_call_with_us"],
                summary["per_call_without_us"],
                added,
                summary["handler_us"],
                20,
            ]
        ],
    )
    print_table(
        f"Prefect's call_hooks per task run, on_running + on_completion, task thread CPU "
        f"(median of {args.repeats} processes)",
        ["no hooks us", "prefect-ws hooks us", "no-op hooks us"],
        [[summary["hooks_none_us"], summary["hooks_ours_us"], summary["hooks_noop_us"]]],
    )
    print_table(
        f"{args.steps}-step DAG x {args.lines} log lines, flow wall time "
        f"(median of {args.repeats})",
        [
            "streaming on s",
            "streaming off s",
            "no-op hooks s",
            "on, memory:// s",
            "on/off (median of runs)",
            "no-op hooks/off",
            "on memory:///off",
            "CPU on/off",
            "CPU no-op hooks/off",
            "on: round trips",
            "on: publisher CPU s",
            "CPU overhead %",
            "target %",
        ],
        [
            [
                summary["dag_on_s"],
                summary["dag_off_s"],
                summary["dag_noop_hooks_s"],
                summary["dag_on_memory_s"],
                summary["dag_paired_ratio"],
                summary["dag_noop_hooks_ratio"],
                summary["dag_on_memory_ratio"],
                summary["dag_cpu_ratio"],
                summary["dag_noop_hooks_cpu_ratio"],
                summary["dag_on_batches"],
                summary["dag_on_publisher_cpu_s"],
                overhead_pct,
                2,
            ]
        ],
    )
    print_table(
        f"Same DAG, CPU inside prefect-ws' own code, all threads (median of {args.repeats})",
        [
            "hooks, handler, lifecycle, UI link s",
            "publisher thread s",
            "share of process CPU %",
            "target %",
        ],
        [
            [
                summary["dag_attributed_entry_cpu_s"],
                summary["dag_attributed_publisher_cpu_s"],
                summary["dag_attributed_pct"],
                2,
            ]
        ],
    )
    if args.other:
        print_table(
            f"Same runs, the 'on' side with prefect_ws from {args.other}",
            [
                "other on s",
                "other on/off",
                "other CPU on/off",
                "other: round trips",
                "other: publisher CPU s",
            ],
            [
                [
                    summary["dag_on_other_s"],
                    summary["dag_other_ratio"],
                    summary["dag_other_cpu_ratio"],
                    summary["dag_other_batches"],
                    summary["dag_other_publisher_cpu_s"],
                ]
            ],
        )
    write_results(
        "overhead" + (f"-{args.tag}" if args.tag else ""),
        args.quick,
        {
            "steps": args.steps,
            "lines": args.lines,
            "calls": calls,
            "repeats": args.repeats,
            "other": args.other or None,
            "summary": summary,
            "per_call": per_call,
            "hooks": hooks,
            "dag": dag,
        },
    )


if __name__ == "__main__":
    main()
