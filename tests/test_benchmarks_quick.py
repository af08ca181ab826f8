"""Every benchmark script runs end to end on tiny sizes (``--quick``), so none of them rots.

Each runs as its own process, exactly as documented in docs/benchmarks.md, and must exit 0,
print its Markdown table and write its JSON result, here into a temporary directory
(``BENCH_RESULTS_DIR``), never into the source tree. The two that run flows share one Prefect
server (log stream flags on) started here, to stay well under a minute in total.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.fixture(scope="module")
def bench_prefect_api() -> Iterator[str]:
    from _common import prefect_server

    with prefect_server() as env:
        yield env["PREFECT_API_URL"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-results")


def _run(script: str, results: Path, *extra: str, timeout: float = 90) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_WS_")}
    env["BENCH_RESULTS_DIR"] = str(results)
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "\n### " in proc.stdout and "|---" in proc.stdout, proc.stdout[-2000:]
    return proc.stdout


def _result(results: Path, name: str) -> dict:
    data: dict = json.loads((results / f"{name}-quick.json").read_text())
    assert data["quick"] is True and data["machine"]["cores"]
    return data


@pytest.mark.timeout(300)
def test_fanout_quick(redis_url: str, results: Path) -> None:
    _run("bench_fanout.py", results, timeout=240)  # four servers side by side
    data = _result(results, "fanout")
    assert data["loop"] == "asyncio"
    for row in data["summary"]:
        assert row["prefect-ws"]["all_delivered"], row  # prefect-ws loses nothing
    # The many-runs case in miniature: 3 runs x 2 clients, one publisher for all runs.
    multi = next(row for row in data["summary"] if row["runs"] > 1)
    assert (multi["runs"], multi["clients_per_run"], multi["clients"]) == (3, 2, 6)
    flood = [r for r in data["runs"] if r["runs"] == 3 and r["kind"] == "flood"]
    assert flood and all(r["publisher"]["runs"] == 3 for r in flood)
    assert all(r["latency"]["n"] > 0 for r in flood if r["mode"] == "prefect-ws")
    _check_anchors(data["servers"])
    for row in data["summary"]:
        for other in data["servers"][1:]:
            assert row[other]["all_delivered"], (other, row)
            assert row["ratios"][other]["flood events/s"] is not None, (other, row)
    assert sum(r["client_cpu_s"] for r in data["runs"]) > 0  # the load clients' own CPU


def _check_anchors(servers: list[str]) -> None:
    """The anchors ran next to prefect-ws: python-websockets always, Node where it is installed."""
    assert servers[0] == "prefect-ws" and "websockets" in servers, servers
    if shutil.which("node") and shutil.which("npm"):
        assert "node-ws" in servers, servers


def test_fanout_quick_workers(redis_url: str, results: Path) -> None:
    """One process and two worker processes on one port, beside the naive endpoint."""
    _run(
        "bench_fanout.py", results, "--workers", "1,2", "--multi-run", "none", "--servers", "naive"
    )
    data = _result(results, "fanout-workers")
    assert data["workers"] == {"prefect-ws": 1, "prefect-ws x2": 2}
    (row,) = data["summary"]
    for mode in ("prefect-ws", "prefect-ws x2"):
        assert row[mode]["all_delivered"], row
    assert row["ratios"]["naive"]["flood events/s"] is not None
    assert row["prefect-ws x2"]["ratio_vs_naive"] is not None
    assert row["prefect-ws x2"]["ratio_vs_one_process"] is not None


def test_fanout_node_flood_client_quick(redis_url: str, results: Path) -> None:
    """``--flood-client node``: the one-run floods read by the Node load client."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("Node is not installed: the Node load client cannot run")
    _run(
        "bench_fanout.py",
        results,
        "--multi-run",
        "none",
        "--servers",
        "node-ws",
        "--flood-client",
        "node",
    )
    data = _result(results, "fanout-node-client")
    assert data["flood_client"] == "node"
    (row,) = data["summary"]
    for mode in ("prefect-ws", "node-ws"):
        assert row[mode]["all_delivered"] and row[mode]["flood_events_per_s"], row
    assert row["ratios"]["node-ws"]["flood events/s"] is not None


def test_fanout_uvloop_quick(redis_url: str, results: Path) -> None:
    """``--loop uvloop`` for both servers; ``--clients none``: only the many-runs case."""
    pytest.importorskip("uvloop")
    _run("bench_fanout.py", results, "--loop", "uvloop", "--clients", "none", "--servers", "naive")
    data = _result(results, "fanout-uvloop")
    assert data["loop"] == "uvloop"
    assert [row["runs"] for row in data["summary"]] == [3]
    assert data["summary"][0]["prefect-ws"]["all_delivered"]


def test_idle_quick(redis_url: str, results: Path) -> None:
    _run("bench_idle.py", results)
    data = _result(results, "idle")
    assert all(r["held"] == r["target"] and r["failed"] == 0 for r in data["results"])
    _check_anchors(data["servers"])


def test_soak_quick(redis_url: str, results: Path) -> None:
    _run("bench_soak.py", results)
    phases = _result(results, "soak")["phases"]
    events = next(p for p in phases if p["phase"] == "events")
    assert events["frames"] == events["expected"]
    data = _result(results, "soak")
    assert data["total_cycles"] == 2 * data["cycles"]
    assert data["frames_expected"] == events["expected"]
    assert all(p.get("failures", 0) == 0 for p in phases)


def test_latency_quick(redis_url: str, bench_prefect_api: str, results: Path) -> None:
    _run("bench_latency.py", results, "--prefect-api-url", bench_prefect_api)
    data = _result(results, "latency")
    for entry in data["summary"].values():
        assert entry["prefect_ws"]["received"] == data["lines"] * data["repeats"]


def test_overhead_quick(redis_url: str, bench_prefect_api: str, results: Path) -> None:
    _run("bench_overhead.py", results, "--prefect-api-url", bench_prefect_api)
    summary = _result(results, "overhead")["summary"]
    assert summary["handler_us"] is not None and summary["dag_on_s"] > 0
    assert summary["dag_attributed_pct"] > 0  # prefect-ws' own share of the flow's CPU


def test_encode_quick(results: Path) -> None:
    _run("bench_encode.py", results)
    encoded = _result(results, "encode")["results"]
    variants = {r["variant"] for r in encoded}
    assert "encode, json" in variants
    if importlib.util.find_spec("orjson") is not None:
        assert "encode, orjson" in variants
    assert all(r["median_us"] and r["median_us"] > 0 for r in encoded)


def test_capacity_quick(redis_url: str, results: Path) -> None:
    """The Redis cost of an event is counted on a private Redis; the plan has every row."""
    _run("bench_capacity.py", results)
    data = _result(results, "capacity")
    single, batched = data["redis_cost"]
    assert single["round_trips_per_event"] == 1  # one script call per batch of one event
    assert single["commands_per_event"] > batched["commands_per_event"]
    assert single["bytes_per_retained_event"] > 100
    assert single["pubsub_messages_per_event_per_subscriber"] == 1
    sizes = {(r["clients"], r["runs"]) for r in data["plan"]}
    assert sizes == {(c, r) for c in (10_000, 100_000, 1_000_000) for r in (1_000, 10_000)}
    row = data["row_check"]
    assert row["delivered"] == row["expected"]


def test_catchup_quick(redis_url: str, results: Path) -> None:
    """Late joiners read a stored run from history; ``--variant``: an A/B second server."""
    _run("bench_catchup.py", results, "--variant", "gc-default:BENCH_GC=default")
    data = _result(results, "catchup")
    assert data["servers"] == ["prefect-ws", "prefect-ws[gc-default]"]
    assert all(r["delivered"] == r["expected"] and r["out_of_order"] == 0 for r in data["runs"])
    # The Node load client where Node is installed, else the Python one.
    assert data["load_client"] == (
        "node" if shutil.which("node") and shutil.which("npm") else "python"
    )
    assert all(r["client"] == data["load_client"] for r in data["runs"])
