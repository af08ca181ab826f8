"""One server process for the benchmarks: ``python benchmarks/_serve.py --port P --mode MODE``.

Modes:
- ``prefect-ws``: the app as ``prefect-ws serve`` runs it (``uvicorn_config``; with
  ``--workers N``, N processes on the port as ``prefect-ws serve --workers N`` runs them);
- ``uvicorn-defaults``: the same app under uvicorn's defaults (``ws=auto``, permessage-deflate on),
  the comparison the connections benchmark asks for;
- ``naive``: ``naive_server.py``, one broadcaster subscription and one unbounded queue per client.

Settings come from ``PREFECT_WS_*`` variables. Raises its own fd limit first. The garbage
collector is tuned as ``prefect-ws serve`` tunes it (:mod:`prefect_ws.server.gctuning`), in
every mode; ``BENCH_GC=default`` keeps CPython's defaults, ``freeze`` only freezes the
start-up heap, for A/B runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time

import uvicorn


def _exit_with_parent() -> None:
    """A benchmark killed hard (SIGKILL, a test timeout) cannot stop us: notice and go."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> None:
    _exit_with_parent()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--mode", choices=["prefect-ws", "uvicorn-defaults", "naive"], default="prefect-ws"
    )
    parser.add_argument("--loop", default="auto", help="uvicorn --loop (auto, asyncio, uvloop)")
    parser.add_argument(
        "--workers", type=int, default=1, help="prefect-ws processes on the port (as serve)"
    )
    args = parser.parse_args()

    from prefect_ws.settings import Settings

    settings = Settings()
    common = {
        "host": "127.0.0.1",
        "port": args.port,
        "log_level": "warning",
        "backlog": 8192,
        "loop": args.loop,
    }
    if args.mode == "prefect-ws" and args.workers > 1:
        from prefect_ws.server.uvicorn.config import serve_workers

        serve_workers(settings, workers=args.workers, **common)
        return
    if args.mode == "prefect-ws":
        from prefect_ws.server.uvicorn.config import uvicorn_config

        config = uvicorn_config(settings, **common)
    elif args.mode == "uvicorn-defaults":
        from prefect_ws.server.app import create_app

        config = uvicorn.Config(create_app(settings), **common)
    else:
        from naive_server import create_naive_app

        config = uvicorn.Config(
            create_naive_app(settings),
            ws="websockets-sansio",
            ws_per_message_deflate=False,
            **common,
        )
    tune_gc(os.environ.get("BENCH_GC", "tuned"))
    uvicorn.Server(config).run()


def tune_gc(mode: str) -> None:
    """``tuned`` as ``prefect-ws serve`` does; ``default`` or ``freeze`` (``gc.freeze()`` after
    start-up, measured and not kept): A/B."""
    import gc

    if mode == "tuned":
        from prefect_ws.server.gctuning import tune_for_serving

        tune_for_serving()
    elif mode == "freeze":
        gc.collect()
        gc.freeze()
    elif mode != "default":
        raise SystemExit(f"BENCH_GC={mode!r}: expected tuned, default or freeze")


if __name__ == "__main__":
    main()
