"""Publisher process for the fan-out and soak benchmarks: the real prefect-ws publishing path.

``python benchmarks/_publish.py --run-id R --n N --rate R``: emits ``run_start`` and flushes,
prints ``STARTED``, waits for a line on stdin, then emits ``N`` ``step_log`` events through
``get_publisher().emit`` (the call the log handler makes), each carrying ``"t"``: its
``time.time_ns()``, then ``run_complete``, flushes and prints one JSON line. ``--rate 0`` emits
as fast as the publisher drains (the deque is kept under ``--window`` events so nothing is
dropped by the bounded buffer).

``--runs R --uuid-base B`` (instead of ``--run-id``) publishes to R runs, ids
``uuid.UUID(int=B + i)``: ``run_start`` for each, then ``N`` events **per run** in round-robin
order (``--rate`` is then the total rate over all runs), then ``run_complete`` for each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

from prefect_ws.publish.publisher import get_publisher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-id", default="")
    parser.add_argument("--runs", type=int, default=0, help="publish to this many runs")
    parser.add_argument("--uuid-base", type=int, default=1, help="with --runs: first run id")
    parser.add_argument("--n", type=int, default=1000, help="events per run")
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--size", type=int, default=120, help="log message length")
    parser.add_argument("--window", type=int, default=5000)
    parser.add_argument("--no-wait", action="store_true", help="do not wait for stdin")
    parser.add_argument("--complete", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    if args.runs:
        run_ids = [str(uuid.UUID(int=args.uuid_base + i)) for i in range(args.runs)]
    elif args.run_id:
        run_ids = [args.run_id]
    else:
        sys.exit("--run-id or --runs is required")

    publisher = get_publisher()
    for run_id in run_ids:
        publisher.emit(run_id, "run_start", {"flowName": "bench", "flowRunId": run_id})
    if not publisher.flush(30):
        sys.exit("publisher could not flush run_start")
    print("STARTED", flush=True)
    if not args.no_wait:
        sys.stdin.readline()

    message = "m" * args.size
    pending = publisher._pending  # bench-only: pace a flood so the bounded buffer never drops
    started = time.perf_counter()
    deadline = time.monotonic() + 600
    runs = len(run_ids)
    for index in range(args.n * runs):
        if args.rate > 0:
            delay = started + index / args.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        else:
            while len(pending) > args.window and time.monotonic() < deadline:
                time.sleep(0.0005)
        publisher.emit(
            run_ids[index % runs],
            "step_log",
            {
                "t": time.time_ns(),
                "stepId": "step-1",
                "level": "INFO",
                "message": message,
                "logger": "bench",
            },
        )
    if args.complete:
        for run_id in run_ids:
            publisher.emit(run_id, "run_complete", {"status": "completed"})
    flushed = publisher.flush(120)
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "runs": runs,
                "emitted": args.n * runs,
                "seconds": round(seconds, 3),
                "flushed": flushed,
                "published": publisher.published,
                "dropped": publisher.dropped,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
