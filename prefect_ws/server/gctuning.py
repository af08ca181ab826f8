"""The cyclic garbage collector, tuned for a serving process (``prefect-ws serve``).

A fan-out server allocates many short-lived objects per event (frames, batches, Redis replies)
and keeps a large, long-lived heap (modules, the app, every connection's state). With CPython's
defaults a young collection runs every 700 net allocations and every tenth one walks the middle
generation too, so the collector kept visiting the same objects: in the catch-up profiles nearly
half of the server's samples were in it. Young collections every 50,000 net allocations halved
the server's CPU per event on that path (``benchmarks/bench_catchup.py --variant
gc-default:BENCH_GC=default``: 3.6 against 6.4 us). ``gc.freeze()`` after start-up gave about
the same alone and nothing measurable on top of the threshold, so it is not done. Reference
counting still frees all acyclic garbage at once; only cycles wait a little longer.
"""

from __future__ import annotations

import gc
from typing import Final

THRESHOLDS: Final = (50_000, 20, 100)  # CPython's defaults: (700, 10, 10)


def tune_for_serving() -> None:
    """Make young collections rarer. Process-wide, so called by ``prefect-ws serve``, not by
    :func:`~prefect_ws.create_app`, which may be mounted in someone else's process."""
    gc.set_threshold(*THRESHOLDS)
