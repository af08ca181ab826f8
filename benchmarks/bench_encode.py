"""Event encode cost on the publishing side: ``events.encode`` with json.dumps vs orjson.dumps.

    .venv/bin/python benchmarks/bench_encode.py [--quick] [--repeats 7]

Micro-benchmark, one process, no server. ``events.encode`` is called as it is (its
``_dumps`` is ``orjson.dumps(..., default=str, option=OPT_NON_STR_KEYS).decode()`` since this
benchmark showed it pays) and as an exact copy of the same function whose ``_dumps`` is the
standard library's ``json.dumps(separators=(",", ":"), ensure_ascii=False, default=str)``, as
it was before. Also timed: the payload's dumps alone, and ``utc_timestamp`` alone, which both
variants share.

Two payloads: a typical ``step_log`` (the log handler's fields, about 200 bytes of JSON) and a
``run_start`` with a large ``parameters`` dict (about 16 KB). Each variant runs ``number`` calls
per repetition, the variants interleaved, and the table gives the median (and the fastest)
microseconds per event over the repetitions. Both variants' output is checked to decode to the
same JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import types
from collections.abc import Callable
from typing import Any

from _common import median, print_table, write_results

from prefect_ws.protocol import events

RUN_ID = "0b5e6f8e-6a53-4c2e-9a1b-2f0a3c4d5e6f"


def step_log_payload() -> dict[str, Any]:
    """What ``PrefectWsHandler.emit`` publishes for one ``logger.info`` in a task."""
    return {
        "stepId": "transform-orders-3",
        "taskRunId": "5f7c1f7e-3b1d-4c6e-8f9a-0d1e2f3a4b5c",
        "level": "INFO",
        "message": "processed batch 42/100: 1,250 rows in 0.84 s (1,488 rows/s)",
        "logger": "prefect.task_runs",
    }


def run_start_payload() -> dict[str, Any]:
    """A ``run_start`` whose flow took a large parameters dict (a config and a record list)."""
    records = [
        {
            "id": i,
            "name": f"customer-{i:05d}",
            "email": f"customer{i}@example.com",
            "score": round(i * 1.37, 2),
            "active": i % 3 != 0,
            "tags": ["priority", "eu-west", f"cohort-{i % 7}"],
            "note": "Größe über 9000, ünïcödé",
        }
        for i in range(80)
    ]
    return {
        "flowName": "nightly-etl",
        "flowRunId": RUN_ID,
        "flowRunName": "glittering-pelican",
        "parameters": {
            "config": {
                "source": {"kind": "postgres", "dsn": "postgresql://etl@db/prod", "batch": 1250},
                "sinks": [
                    {"kind": "s3", "bucket": f"lake-{n}", "prefix": "orders/"} for n in (1, 2)
                ],
                "retries": 3,
                "dry_run": False,
            },
            "records": records,
        },
        "layers": [[f"step-{layer}-{i}" for i in range(10)] for layer in range(5)],
    }


def stdlib_dumps(value: Any) -> str:
    """``events._dumps`` before it used orjson (commit 1132506 and earlier)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def with_dumps(dumps: Callable[[Any], str]) -> Callable[..., events.Draft]:
    """``events.encode`` itself, the same code object, with ``_dumps`` replaced by ``dumps``."""
    encode = events.encode
    namespace = {**vars(events), "_dumps": dumps}
    copy = types.FunctionType(encode.__code__, namespace, encode.__name__, encode.__defaults__)
    return copy  # type: ignore[return-value]


def per_call_us(fn: Callable[[], Any], number: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(number):
        fn()
    return (time.perf_counter_ns() - started) / number / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    numbers = {"step_log": 500, "run_start (large parameters)": 50}
    if not args.quick:
        numbers = {"step_log": 50_000, "run_start (large parameters)": 2_000}

    payloads = {
        "step_log": ("step_log", step_log_payload()),
        "run_start (large parameters)": ("run_start", run_start_payload()),
    }
    ts = time.time()

    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    for name, (kind, payload) in payloads.items():
        number = numbers[name]
        encode_json = with_dumps(stdlib_dumps)
        a = events.encode(RUN_ID, kind, payload, ts).complete(7)
        b = encode_json(RUN_ID, kind, payload, ts).complete(7)
        if json.loads(a) != json.loads(b):
            raise SystemExit(f"{name}: orjson output decodes differently")
        variants: dict[str, Callable[[], Any]] = {
            "encode, json": lambda k=kind, p=payload, e=encode_json: e(RUN_ID, k, p, ts),
            "payload dumps, json": lambda p=payload: stdlib_dumps(p),
            "encode, orjson": lambda k=kind, p=payload: events.encode(RUN_ID, k, p, ts),
            "payload dumps, orjson": lambda p=payload: events._dumps(p),
        }
        variants["utc_timestamp (shared)"] = lambda: events.utc_timestamp(ts)

        samples: dict[str, list[float]] = {v: [] for v in variants}
        for fn in variants.values():
            per_call_us(fn, max(1, number // 10))  # warm-up
        for _ in range(repeats):
            for variant, fn in variants.items():
                samples[variant].append(per_call_us(fn, number))
        size = len(events.encode(RUN_ID, kind, payload, ts).complete(7).encode())
        payload_size = len(events._dumps(payload).encode())
        json_us = median(samples["encode, json"])
        orjson_us = median(samples["encode, orjson"])
        for variant, values in samples.items():
            entry = {
                "payload": name,
                "event_bytes": size,
                "payload_bytes": payload_size,
                "variant": variant,
                "number": number,
                "median_us": median(values),
                "min_us": round(min(values), 3),
                "samples_us": [round(v, 3) for v in values],
            }
            results.append(entry)
            speedup = (
                round(json_us / orjson_us, 2)
                if variant == "encode, orjson" and json_us and orjson_us
                else ""
            )
            rows.append(
                [name, payload_size, size, variant, entry["median_us"], entry["min_us"], speedup]
            )
            print(entry, flush=True)

    print_table(
        f"Event encode on the publishing side, µs per event (median of {repeats})",
        [
            "event",
            "payload bytes",
            "event bytes",
            "variant",
            "µs median",
            "µs min",
            "json / orjson",
        ],
        rows,
    )
    write_results("encode", args.quick, {"repeats": repeats, "results": results})


if __name__ == "__main__":
    main()
