"""Every benchmark script runs end to end on tiny sizes (``--quick``), so none of them rots.

Each runs as its own process, exactly as documented in docs/benchmarks.md, and must exit 0,
print its Markdown table and write its JSON result. The two that run flows share one Prefect
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


def _run(script: str, *extra: str, timeout: float = 90) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_WS_")}
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


def _result(name: str) -> dict:
    data: dict = json.loads((BENCH / "results" / f"{name}-quick.json").read_text())
    assert data["quick"] is True and data["machine"]["cores"]
    return data


@pytest.mark.timeout(300)
def test_fanout_quick(redis_url: str) -> None:
    _run("bench_fanout.py", timeout=240)  # four servers side by side
    data = _result("fanout")
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


def test_fanout_uvloop_quick(redis_url: str) -> None:
    """``--loop uvloop`` for both servers; ``--clients none``: only the many-runs case."""
    pytest.importorskip("uvloop")
    _run("bench_fanout.py", "--loop", "uvloop", "--clients", "none", "--servers", "naive")
    data = _result("fanout-uvloop")
    assert data["loop"] == "uvloop"
    assert [row["runs"] for row in data["summary"]] == [3]
    assert data["summary"][0]["prefect-ws"]["all_delivered"]


def test_idle_quick(redis_url: str) -> None:
    _run("bench_idle.py")
    data = _result("idle")
    assert all(r["held"] == r["target"] and r["failed"] == 0 for r in data["results"])
    _check_anchors(data["servers"])


def test_soak_quick(redis_url: str) -> None:
    _run("bench_soak.py")
    phases = _result("soak")["phases"]
    events = next(p for p in phases if p["phase"] == "events")
    assert events["frames"] == events["expected"]
    data = _result("soak")
    assert data["total_cycles"] == 2 * data["cycles"]
    assert data["frames_expected"] == events["expected"]
    assert all(p.get("failures", 0) == 0 for p in phases)


def test_latency_quick(redis_url: str, bench_prefect_api: str) -> None:
    _run("bench_latency.py", "--prefect-api-url", bench_prefect_api)
    data = _result("latency")
    for entry in data["summary"].values():
        assert entry["prefect_ws"]["received"] == data["lines"] * data["repeats"]


def test_overhead_quick(redis_url: str, bench_prefect_api: str) -> None:
    _run("bench_overhead.py", "--prefect-api-url", bench_prefect_api)
    summary = _result("overhead")["summary"]
    assert summary["handler_us"] is not None and summary["dag_on_s"] > 0


def test_encode_quick() -> None:
    _run("bench_encode.py")
    results = _result("encode")["results"]
    variants = {r["variant"] for r in results}
    assert "encode, json" in variants
    if importlib.util.find_spec("orjson") is not None:
        assert "encode, orjson" in variants
    assert all(r["median_us"] and r["median_us"] > 0 for r in results)


def test_catchup_quick(redis_url: str) -> None:
    """Late joiners read a stored run from history; ``--variant``: an A/B second server."""
    _run("bench_catchup.py", "--variant", "gc-default:BENCH_GC=default")
    data = _result("catchup")
    assert data["servers"] == ["prefect-ws", "prefect-ws[gc-default]"]
    assert all(r["delivered"] == r["expected"] and r["out_of_order"] == 0 for r in data["runs"])
