"""Capacity: the Redis cost of an event, the plan of docs/scaling.md, and one of its rows checked.

    .venv/bin/python benchmarks/bench_capacity.py [--quick] [--runs 100 --clients-per-run 10]

1. **Redis cost of an event**, on a throwaway redis-server of this script's own (so nobody
   else's commands are counted) with one server-side subscriber on every run, through the real
   publishing path (``Publisher.emit``, then ``flush``: one round trip per batch). Batches of 1
   (a run at 10 events/s sends each event as it comes) and of 10: commands Redis executes per
   event (``INFO commandstats``, the script's inner commands included), Redis CPU per event,
   pub/sub messages per event, and bytes per retained event (``MEMORY USAGE`` of the runs'
   history streams over the events they hold).
2. **A row checked here**: R runs x C clients at 10 events/s per run against one prefect-ws
   process (bench_fanout's paced case, load clients in 2 processes): all delivered, latency,
   and the server's CPU per delivered event, which gives the plan its per-process figure.
3. **The plan**: :func:`plan` turns those figures into the table of docs/scaling.md
   (processes, hosts, Redis shards for 10k / 100k / 1M clients and 1k / 10k runs at 10
   events/s each), printed with every input.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from _common import (
    REDIS_URL,
    cleanup_redis,
    cpu_seconds,
    free_port,
    prefect_ws_server,
    print_table,
    raise_nofile,
    redis_prefix,
    stop,
    wait_port,
    write_results,
)
from bench_fanout import publisher_env, run_case

EVENTS_PER_RUN_PER_S = 10.0
# docs/benchmarks.md §3: one process, flood, 100 runs x 10 clients (153,564 events/s; one run
# to 1000 clients reached 376k). A flood packs many events into each message and write; at 10
# events/s per run each event travels alone, so the plan uses the row check's CPU per delivered
# event instead (paced, as in the plan), at CPU_TARGET of a core. The flood figure is the
# fallback when the row check is too small to time (--quick).
FLOOD_EVENTS_PER_PROCESS = 153_564
CPU_TARGET = 0.7  # of a core per worker: headroom for bursts, replays after a restart, TLS
# docs/benchmarks.md §4: 11.6 KB per idle connection at 10k; PREFECT_WS_MAX_CONNECTIONS's default.
KB_PER_CONNECTION = 11.6
CONNECTIONS_PER_PROCESS = 10_000
WORKERS_PER_HOST = 8  # an 8-core host, one worker per core (serve --workers auto)
# A Redis shard's main thread, planned at half a core; memory per shard planned at 25 GB.
REDIS_CORE_SHARE = 0.5
REDIS_GB_PER_SHARD = 25.0
RUN_MINUTES = 10.0  # how long a run lasts (its history is kept that long, plus the TTL)
TTL_HOURS = 1.0  # PREFECT_WS_HISTORY_TTL_SECONDS=3600 (the default, 24 h, is named below)


EPHEMERAL = ("--save", "", "--appendonly", "no")


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        sys.exit("redis-server is not installed")
    return found


def redis_cost(events_per_run: int, runs: int, batch: int) -> dict[str, Any]:
    """Publish ``runs x events_per_run`` events in batches of ``batch`` to a private Redis."""
    port = free_port()
    directory = tempfile.mkdtemp(prefix="bench-capacity-")
    proc = subprocess.Popen(
        [
            redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            directory,
            *EPHEMERAL,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, 10, proc)
        return asyncio.run(_publish_and_count(port, proc.pid, events_per_run, runs, batch))
    finally:
        stop(proc)
        shutil.rmtree(directory, ignore_errors=True)


async def _publish_and_count(
    port: int, redis_pid: int, events_per_run: int, runs: int, batch: int
) -> dict[str, Any]:
    import uuid

    import redis.asyncio as aioredis

    from prefect_ws.backends import RedisBackend
    from prefect_ws.publish.publisher import Publisher
    from prefect_ws.settings import Settings

    url = f"redis://127.0.0.1:{port}/0"
    settings = Settings(broadcast_url=url, redis_prefix="capacity")
    run_ids = [str(uuid.uuid4()) for _ in range(runs)]
    subscriber = RedisBackend(url, prefix="capacity")  # a server process watching every run
    await subscriber.connect()
    for run_id in run_ids:
        await subscriber.subscribe(run_id)
    received = 0

    async def drain() -> None:
        nonlocal received
        while True:
            event = await subscriber.next_published()
            received += event.message != ""

    drainer = asyncio.create_task(drain())
    admin = aioredis.Redis(host="127.0.0.1", port=port)
    publisher = Publisher(settings)
    message = "x" * 100  # a typical log line
    publisher.emit(run_ids[0], "step_log", {"stepId": "warm", "level": "INFO", "message": "up"})
    await asyncio.to_thread(publisher.flush, 10)  # script loaded, connections open
    deadline = time.monotonic() + 10
    while received < 1 and time.monotonic() < deadline:  # the warm-up event is not counted
        await asyncio.sleep(0.01)
    received = 0
    await admin.config_resetstat()
    cpu0 = cpu_seconds(redis_pid)
    started = time.perf_counter()
    published = 0

    def publish_all() -> None:
        nonlocal published
        for n in range(0, events_per_run, batch):
            for run_id in run_ids:
                for i in range(batch):
                    payload = {"stepId": "s", "level": "INFO", "message": f"{n + i} {message}"}
                    publisher.emit(run_id, "step_log", payload)
                assert publisher.flush(10)
                published += batch

    await asyncio.to_thread(publish_all)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(redis_pid) - cpu0
    stats: dict[str, Any] = await admin.info("commandstats")
    calls = {name[8:]: int(value["calls"]) for name, value in stats.items()}
    deadline = time.monotonic() + 10
    while received < published // batch and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stream_bytes = 0
    stored = 0
    for run_id in run_ids:
        key = f"capacity:{{{run_id}}}:events"
        stream_bytes += int(await admin.memory_usage(key, samples=0) or 0)
        stored += int(await admin.xlen(key))
    drainer.cancel()
    await asyncio.to_thread(publisher.close, 5)
    await subscriber.disconnect()
    await admin.aclose()
    ours = {k: v for k, v in calls.items() if k not in ("info", "config|resetstat", "config")}
    return {
        "batch": batch,
        "events": published,
        "seconds": round(seconds, 3),
        "commands_per_event": round(sum(ours.values()) / published, 2),
        "round_trips_per_event": round(ours.get("evalsha", 0) / published, 3),
        "commands": ours,
        "redis_cpu_us_per_event": round(cpu / published * 1e6, 2),
        "pubsub_messages_per_event_per_subscriber": round(received / published, 3),
        "bytes_per_retained_event": round(stream_bytes / stored, 1) if stored else None,
    }


def plan(
    events_per_process: float, redis_us_per_event: float, bytes_per_event: float
) -> list[dict[str, Any]]:
    """The table of docs/scaling.md: every client watches one run at 10 events/s, clients are
    spread evenly over the runs, and a load balancer routes a run's clients to as few
    processes as their number needs (consistent hashing on the run id in the path)."""
    rows = []
    for clients in (10_000, 100_000, 1_000_000):
        for runs in (1_000, 10_000):
            published = runs * EVENTS_PER_RUN_PER_S
            delivered = clients * EVENTS_PER_RUN_PER_S
            by_connections = math.ceil(clients / CONNECTIONS_PER_PROCESS)
            by_events = math.ceil(delivered / events_per_process)
            processes = max(by_connections, by_events)
            # Processes a run's clients span when routed by run id: as many as they fill.
            per_run = max(1, math.ceil(clients / runs / CONNECTIONS_PER_PROCESS))
            # Each process a run spans receives its pub/sub messages: Redis CPU grows with it.
            redis_cores = published * redis_us_per_event * 1e-6 * per_run
            retained_events = published * (RUN_MINUTES * 60 + TTL_HOURS * 3600)
            retained_gb = retained_events * bytes_per_event / 1e9
            shards = max(
                1,
                math.ceil(redis_cores / REDIS_CORE_SHARE),
                math.ceil(retained_gb / REDIS_GB_PER_SHARD),
            )
            rows.append(
                {
                    "clients": clients,
                    "runs": runs,
                    "published_per_s": published,
                    "delivered_per_s": delivered,
                    "processes_by_connections": by_connections,
                    "processes_by_events": by_events,
                    "processes": processes,
                    "hosts": math.ceil(processes / WORKERS_PER_HOST),
                    "memory_gb_per_process": round(
                        clients / processes * KB_PER_CONNECTION / 1e6, 2
                    ),
                    "redis_cores": round(redis_cores, 2),
                    "retained_gb": round(retained_gb, 1),
                    "redis_shards": shards,
                }
            )
    return rows


def check_row(runs: int, clients_per_run: int, seconds: float) -> dict[str, Any]:
    """One prefect-ws process, ``runs`` runs x ``clients_per_run`` clients at 10 events/s each."""
    prefix = redis_prefix("capacity")
    n = max(10, int(seconds * EVENTS_PER_RUN_PER_S))
    try:
        with prefect_ws_server(REDIS_URL, prefix) as (proc, port):
            result = run_case(
                port,
                proc.pid,
                clients_per_run,
                n,
                EVENTS_PER_RUN_PER_S * runs,
                seconds + 120,
                publisher_env(prefix),
                runs=runs,
            )
    finally:
        cleanup_redis(prefix)
    delivered = result["delivered"]
    cpu = result["server_cpu_s"]
    result["server_cpu_us_per_delivered_event"] = (
        round(cpu / delivered * 1e6, 2) if delivered else None
    )
    result["events_per_s_at_one_core"] = round(delivered / cpu) if cpu else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--runs", type=int, default=100, help="runs in the row check")
    parser.add_argument("--clients-per-run", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the row check")
    args = parser.parse_args()
    raise_nofile()
    if args.quick:
        args.runs, args.clients_per_run, args.seconds = 3, 2, 2.0
    events_per_run, cost_runs = (20, 5) if args.quick else (200, 20)

    costs = [redis_cost(events_per_run, cost_runs, batch) for batch in (1, 10)]
    print_table(
        "Redis cost of an event (private redis-server, one subscriber on every run)",
        [
            "batch",
            "events",
            "commands/event",
            "round trips/event",
            "Redis CPU us/event",
            "pub/sub msgs/event",
            "bytes/retained event",
        ],
        [
            [
                c["batch"],
                c["events"],
                c["commands_per_event"],
                c["round_trips_per_event"],
                c["redis_cpu_us_per_event"],
                c["pubsub_messages_per_event_per_subscriber"],
                c["bytes_per_retained_event"],
            ]
            for c in costs
        ],
    )
    row = check_row(args.runs, args.clients_per_run, args.seconds)
    print_table(
        f"Row check: one process, {args.runs} runs x {args.clients_per_run} clients at 10 "
        "events/s per run",
        [
            "clients",
            "delivered/expected",
            "delivered/s",
            "p50 ms",
            "p99 ms",
            "server CPU s",
            "CPU us/delivered event",
            "events/s at one core",
        ],
        [
            [
                row["clients"],
                f"{row['delivered']}/{row['expected']}",
                round(row["delivered"] / max(args.seconds, 1e-9)),
                row["latency"]["p50_ms"],
                row["latency"]["p99_ms"],
                row["server_cpu_s"],
                row["server_cpu_us_per_delivered_event"],
                row["events_per_s_at_one_core"],
            ]
        ],
    )
    at_one_core = row["events_per_s_at_one_core"] if row["server_cpu_s"] >= 1.0 else None
    events_per_process = (at_one_core or FLOOD_EVENTS_PER_PROCESS / 2) * (
        CPU_TARGET if at_one_core else 1.0
    )
    single = costs[0]
    rows = plan(
        events_per_process,
        single["redis_cpu_us_per_event"],
        single["bytes_per_retained_event"] or 0.0,
    )
    print_table(
        f"Plan: 10 events/s per run, {events_per_process:,.0f} delivered events/s and "
        f"{CONNECTIONS_PER_PROCESS:,} connections per process, {WORKERS_PER_HOST} per host",
        [
            "clients",
            "runs",
            "published/s",
            "delivered/s",
            "processes (conn / events)",
            "hosts",
            "GB/process (conns)",
            "Redis cores",
            "retained GB",
            "Redis shards",
        ],
        [
            [
                r["clients"],
                r["runs"],
                r["published_per_s"],
                r["delivered_per_s"],
                f"{r['processes']} ({r['processes_by_connections']} / {r['processes_by_events']})",
                r["hosts"],
                r["memory_gb_per_process"],
                r["redis_cores"],
                r["retained_gb"],
                r["redis_shards"],
            ]
            for r in rows
        ],
    )
    write_results(
        "capacity",
        args.quick,
        {
            "assumptions": {
                "events_per_run_per_s": EVENTS_PER_RUN_PER_S,
                "flood_events_per_process": FLOOD_EVENTS_PER_PROCESS,
                "cpu_target": CPU_TARGET,
                "planned_events_per_process": round(events_per_process),
                "kb_per_connection": KB_PER_CONNECTION,
                "connections_per_process": CONNECTIONS_PER_PROCESS,
                "workers_per_host": WORKERS_PER_HOST,
                "redis_core_share": REDIS_CORE_SHARE,
                "redis_gb_per_shard": REDIS_GB_PER_SHARD,
                "run_minutes": RUN_MINUTES,
                "ttl_hours": TTL_HOURS,
            },
            "redis_cost": costs,
            "plan": rows,
            "row_check": row,
        },
    )


if __name__ == "__main__":
    main()
