"""The entry points in fresh processes: ``prefect-ws run`` over Redis and with memory://, and the
deployable flow in flows/ run the way a Prefect worker runs a deployment (``python -m
prefect.engine``), each streamed to a real WebSocket client through a real uvicorn hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
from helpers import assert_run_sequence, stream_path
from test_workflow_runs import LiveClient, by_step, seconds

from prefect_ws.clients.follow import stream_url
from prefect_ws.server.uvicorn.config import serve_in_thread
from prefect_ws.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from prefect_ws.cli.main import main; main()"]
DIAMOND_LOGS: dict[str | None, list[str]] = {
    "extract": ["extracting 10 rows", "extracted 10 rows"],
    "transform_sum": ["summing 10 values", "sum is 453"],
    "transform_max": ["scanning 10 values for the maximum", "maximum is 94"],
    "load": ["loading total=453 peak=94 into warehouse.summary"],
}


@pytest.fixture
def redis_hub(
    prefect_api: str, redis_url: str, redis_prefix: str
) -> Iterator[tuple[str, dict[str, str]]]:
    settings = Settings(broadcast_url=redis_url, redis_prefix=redis_prefix, log_level="WARNING")
    env = {
        **os.environ,
        "PREFECT_WS_BROADCAST_URL": redis_url,
        "PREFECT_WS_REDIS_PREFIX": redis_prefix,
    }
    with serve_in_thread(settings) as base_url:
        yield base_url, env


def test_cli_run_prints_run_id_and_url_first_then_streams_over_redis(
    redis_hub: tuple[str, dict[str, str]],
) -> None:
    base_url, env = redis_hub
    proc = subprocess.Popen(
        [*CLI, "run", "examples/diamond.yaml", "--param", "rows=10", "--url", base_url],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    printed: dict[str, str] = {}
    while "stream" not in printed:
        line = proc.stdout.readline()
        assert line, (
            f"command ended early: {proc.wait(30)} {proc.stderr.read() if proc.stderr else ''}"
        )
        key, _, value = line.strip().partition(": ")
        printed[key] = value
    url_printed_at = time.time()
    client = LiveClient(base_url + stream_path(printed["run id"]))
    client.start()
    stdout, stderr = proc.communicate(timeout=90)
    client.join()

    assert proc.returncode == 0, stderr
    assert printed["workflow"] == "Diamond ETL (4 steps)"
    assert printed["flow run"].startswith("diamond-etl-")
    assert printed["stream"] == stream_url(base_url, printed["run id"])
    assert stdout.strip() == f"run completed: {printed['run id']}"
    events = client.events
    assert_run_sequence(events, DIAMOND_LOGS)
    first_step = next(e for e in events if e["type"] == "step_start")
    assert url_printed_at < seconds(first_step) + 0.05  # printed before the first step started
    assert events[0]["payload"]["flowRunName"] == printed["flow run"]
    assert events[-1]["payload"]["status"] == "completed"


def test_cli_failing_run_exits_1_and_watch_prints_the_stream(prefect_api: str) -> None:
    done = subprocess.run(
        [*CLI, "run", str(ROOT / "examples" / "failing.yaml"), "--watch"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )
    assert done.returncode == 1, done.stderr
    assert "serving the stream from this process" in done.stdout
    assert "run failed: WorkflowFailed: 1 step(s) failed: validate; 2 skipped" in done.stderr
    rendered = done.stdout
    for fragment in (
        "run started failing-etl",
        "validate failed",
        "ValueError: 9 row(s) above 50",
        "report skipped",
        "publish skipped",
        "archive completed",
        "run failed",
    ):
        assert fragment in rendered, (fragment, rendered)
    assert (
        rendered.index("validate failed")
        < rendered.index("report skipped")
        < rendered.index("run failed")
    )


def test_deployable_flow_runs_like_a_worker_runs_it(redis_hub: tuple[str, dict[str, str]]) -> None:
    """flows/workflow.py as a deployment: definition as a parameter, executed by prefect.engine."""
    from prefect.client.orchestration import get_client
    from prefect.deployments.runner import RunnerDeployment

    from prefect_ws.workflow.runner import prepare_run

    base_url, env = redis_hub
    _, parameters = prepare_run(ROOT / "examples" / "diamond.yaml", {"rows": 10})
    previous = os.getcwd()
    os.chdir(ROOT)
    try:
        deployment = RunnerDeployment.from_entrypoint(
            "flows/workflow.py:workflow", name="diamond-test", parameters=parameters
        )
        deployment_id = deployment.apply()
        assert isinstance(deployment_id, UUID)
    finally:
        os.chdir(previous)
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
        assert stored.entrypoint == "flows/workflow.py:workflow"
        assert stored.parameter_openapi_schema is not None
        assert set(stored.parameter_openapi_schema["properties"]) == {
            "definition",
            "parameters",
            "workflow_dir",
        }
        flow_run = client.create_flow_run_from_deployment(deployment_id)
    run_id = str(flow_run.id)
    live = LiveClient(base_url + stream_path(run_id))
    live.start()
    done = subprocess.run(
        [sys.executable, "-m", "prefect.engine"],
        cwd=ROOT,
        env={**env, "PREFECT__FLOW_RUN_ID": run_id},
        capture_output=True,
        text=True,
        timeout=90,
    )
    live.join()
    assert done.returncode == 0, done.stderr[-3000:]
    events = live.events
    assert_run_sequence(events, DIAMOND_LOGS)
    start = events[0]["payload"]
    assert start["flowName"] == "prefect-ws-workflow"
    assert start["layers"] == [["extract"], ["transform_sum", "transform_max"], ["load"]]
    assert start["flowRunName"].startswith("diamond-etl-")
    assert set(by_step(events, "step_complete")) == {
        "extract",
        "transform_sum",
        "transform_max",
        "load",
    }
    assert events[-1]["payload"]["status"] == "completed"
    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(flow_run.id)
    assert finished.state is not None and finished.state.type.value == "COMPLETED"
    assert finished.name == start["flowRunName"]


def test_demo_runs_the_packaged_diamond_through_the_runner(prefect_api: str) -> None:
    """From /, so only what the package ships is available (as after a plain pip install)."""
    done = subprocess.run(
        [*CLI, "demo"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for fragment in (
        "run started prefect-ws-demo",
        "layers: [['extract'], ['transform_sum', 'transform_max'], ['load']]",
        "[extract] connecting to the source",
        "[transform_sum] summed part 3 of 3",
        "[transform_max] largest value is 100",
        "WARNING [transform_max] outlier above 90 found; keeping it",
        "load completed",
        "run completed",
        "steps: 4 completed",
        "Replay it: websocat",
    ):
        assert fragment in out, (fragment, out)
    assert out.index("run id:") < out.index("extract started") < out.index("load completed")
