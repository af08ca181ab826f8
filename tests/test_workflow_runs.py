"""Workflows run for real: Prefect flow runs in this process, the memory:// hub on uvicorn, and a
WebSocket client connected before the first step starts (it records when each frame arrived).

Step functions used by inline workflows live at the bottom of this module (pytest puts tests/ on
sys.path, so ``test_workflow_runs:<name>`` imports).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from helpers import assert_run_sequence, stream_path
from websockets.asyncio.client import connect

from prefect_ws.server.uvicorn.config import serve_in_thread
from prefect_ws.settings import Settings
from prefect_ws.workflow import WorkflowRun, dag, run_workflow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
HERE = "test_workflow_runs"


class LiveClient:
    """A real WebSocket client in its own thread; notes the arrival time of every frame."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[dict[str, Any]] = []
        self.control: list[dict[str, Any]] = []  # frames that are not run events (no seq)
        self.arrived: list[float] = []
        self.close_code: int | None = None
        self.connected = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with asyncio.timeout(120):
            async with connect(self.url, compression=None, max_size=2**24) as websocket:
                self.connected.set()
                async for message in websocket:
                    frame = json.loads(message)
                    if "seq" not in frame:
                        self.control.append(frame)
                        continue
                    self.arrived.append(time.monotonic())
                    self.events.append(frame)
                self.close_code = websocket.close_code

    def start(self) -> None:
        self.thread.start()
        assert self.connected.wait(10), "client did not connect"

    def join(self, timeout: float = 30) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream did not end with run_complete"

    def index(self, type: str, step: str | None = None) -> int:
        matches = [
            i
            for i, e in enumerate(self.events)
            if e["type"] == type and (step is None or e["payload"].get("stepId") == step)
        ]
        assert len(matches) == 1, (type, step, matches)
        return matches[0]


@pytest.fixture
def hub(prefect_api: str) -> Iterator[str]:
    with serve_in_thread(Settings(broadcast_url="memory://", log_level="WARNING")) as base_url:
        yield base_url


def run_watched(
    base_url: str, definition: Any, parameters: dict[str, Any] | None = None, **kwargs: Any
) -> tuple[WorkflowRun, LiveClient]:
    clients: list[LiveClient] = []

    def on_start(run_id: str, flow_run_name: str) -> None:
        client = LiveClient(base_url + stream_path(run_id))
        client.start()
        clients.append(client)

    result = run_workflow(definition, parameters, on_start=on_start, **kwargs)
    (client,) = clients
    client.join()
    assert client.close_code == 1000
    assert all(e["runId"] == result.run_id for e in client.events)
    return result, client


def seconds(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def by_step(events: list[dict[str, Any]], type: str) -> dict[str, dict[str, Any]]:
    return {e["payload"]["stepId"]: e for e in events if e["type"] == type}


# -- the diamond -------------------------------------------------------------------------------
def test_diamond_layers_overlap_logs_and_order(hub: str) -> None:
    result, client = run_watched(hub, EXAMPLES / "diamond.yaml", {"rows": 10})
    events = client.events
    values = [(i * 37) % 101 for i in range(10)]
    total, peak = sum(values), max(values)
    assert result.ok and result.results is not None
    assert result.results["load"] == f"total={total} peak={peak}"

    assert_run_sequence(
        events,
        {
            "extract": ["extracting 10 rows", "extracted 10 rows"],
            "transform_sum": ["summing 10 values", f"sum is {total}"],
            "transform_max": ["scanning 10 values for the maximum", f"maximum is {peak}"],
            "load": [f"loading total={total} peak={peak} into warehouse.summary"],
        },
    )
    start = events[0]["payload"]
    assert start["layers"] == [["extract"], ["transform_sum", "transform_max"], ["load"]]
    assert start["flowName"] == "diamond-etl" and start["flowRunId"] == result.run_id
    assert start["flowRunName"] == result.flow_run_name and result.flow_run_name.startswith(
        "diamond-etl-"
    )
    assert start["parameters"]["parameters"] == {"rows": 10, "target": "warehouse.summary"}

    starts, completes = by_step(events, "step_start"), by_step(events, "step_complete")
    assert {s: e["payload"]["layer"] for s, e in starts.items()} == {
        "extract": 0,
        "transform_sum": 1,
        "transform_max": 1,
        "load": 2,
    }
    assert all(e["payload"]["attempt"] == 1 for e in starts.values())
    assert all(e["payload"]["status"] == "completed" for e in completes.values())
    # t1 and t2 overlap: both started before either completed, and the 1 s + 1 s layer took < 1.8 s.
    both = ("transform_sum", "transform_max")
    assert max(client.index("step_start", s) for s in both) < min(
        client.index("step_complete", s) for s in both
    )
    layer_time = max(seconds(completes[s]) for s in both) - min(seconds(starts[s]) for s in both)
    assert 1.0 <= layer_time < 1.8, layer_time
    # load waited for both, extract came first
    assert client.index("step_start", "load") > max(client.index("step_complete", s) for s in both)
    assert client.index("step_complete", "extract") < min(
        client.index("step_start", s) for s in both
    )

    done = events[-1]
    assert done["type"] == "run_complete" and done["payload"]["status"] == "completed"
    assert done["payload"]["steps"] == {
        "completed": 4,
        "failed": 0,
        "skipped": 0,
        "cancelled": 0,
        "crashed": 0,
    }


# -- failure semantics -------------------------------------------------------------------------
def test_failing_workflow_skips_descendants_keeps_independent_branch(hub: str) -> None:
    from prefect.client.orchestration import get_client

    result, client = run_watched(hub, EXAMPLES / "failing.yaml")
    events = client.events
    too_big = sum(1 for i in range(20) if (i * 37) % 101 > 50)
    assert result.status == "failed"
    assert result.error == "WorkflowFailed: 1 step(s) failed: validate; 2 skipped"

    completes = {s: e["payload"] for s, e in by_step(events, "step_complete").items()}
    assert {s: p["status"] for s, p in completes.items()} == {
        "extract": "completed",
        "validate": "failed",
        "report": "skipped",
        "publish": "skipped",
        "archive": "completed",
    }
    assert completes["validate"]["error"] == f"ValueError: {too_big} row(s) above 50"
    for skipped in ("report", "publish"):
        payload = completes[skipped]
        assert payload["reason"] == "upstream step 'validate' failed"
        assert payload["duration"] is None and payload["error"] is None and payload["taskRunId"]
    # Skipped steps never started; they are reported after the failure, in dependency order.
    assert set(by_step(events, "step_start")) == {"extract", "validate", "archive"}
    assert client.index("step_complete", "validate") < client.index("step_complete", "report")
    assert client.index("step_complete", "report") < client.index("step_complete", "publish")
    assert_run_sequence(
        events,
        {
            "extract": ["extracting 20 rows", "extracted 20 rows"],
            "validate": ["checked 20 rows against max_value=50"],
            "archive": ["archived 20 rows"],
        },
    )
    done = events[-1]["payload"]
    assert done["status"] == "failed" and done["failedSteps"] == ["validate"]
    assert done["steps"] == {
        "completed": 2,
        "failed": 1,
        "skipped": 2,
        "cancelled": 0,
        "crashed": 0,
    }
    assert "validate" in done["error"]
    with get_client(sync_client=True) as prefect:
        state = prefect.read_flow_run(UUID(result.run_id)).state
    assert state is not None and state.type.value == "FAILED"


def test_retries_emit_a_new_step_start_with_the_attempt(hub: str, tmp_path: Path) -> None:
    definition = {
        "id": "retrying",
        "steps": [
            {
                "id": "flaky",
                "run": f"{HERE}:flaky",
                "params": {"marker": str(tmp_path / "tried"), "failures": 2},
                "retries": 2,
                "retry_delay_seconds": 0,
            },
            {"id": "after", "run": f"{HERE}:echo", "needs": ["flaky"]},
        ],
    }
    result, client = run_watched(hub, definition)
    assert result.ok and result.results == {"flaky": 3, "after": 3}
    flaky = [e for e in client.events if e["payload"].get("stepId") == "flaky"]
    assert [
        (e["type"], e["payload"].get("attempt") or e["payload"].get("status")) for e in flaky
    ] == [
        ("step_start", 1),
        ("step_log", None),
        ("step_start", 2),
        ("step_log", None),
        ("step_start", 3),
        ("step_log", None),
        ("step_complete", "completed"),
    ]
    assert [e["payload"]["message"] for e in flaky if e["type"] == "step_log"] == [
        "attempt 1",
        "attempt 2",
        "attempt 3",
    ]
    assert client.events[-1]["payload"]["steps"]["completed"] == 2


def test_a_step_starts_when_its_own_needs_are_done(hub: str) -> None:
    """No layer barrier: 'quick_child' needs only 'quick', so it runs while 'slow' still sleeps."""
    definition = {
        "id": "no-barrier",
        "steps": [
            {"id": "slow", "run": f"{HERE}:nap", "params": {"seconds": 1.5}},
            {"id": "quick", "run": f"{HERE}:nap", "params": {"seconds": 0.1}},
            {
                "id": "quick_child",
                "run": f"{HERE}:nap",
                "needs": ["quick"],
                "params": {"seconds": 0.1},
            },
            {
                "id": "join",
                "run": f"{HERE}:nap",
                "needs": ["slow", "quick_child"],
                "params": {"seconds": 0},
            },
        ],
    }
    result, client = run_watched(hub, definition)
    assert result.ok
    assert client.events[0]["payload"]["layers"] == [["slow", "quick"], ["quick_child"], ["join"]]
    assert client.index("step_complete", "quick_child") < client.index("step_complete", "slow")
    assert client.index("step_start", "join") > client.index("step_complete", "slow")


def test_a_run_loads_and_validates_its_workflow_once_before_and_once_inside(
    hub: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the flow run exists (to refuse an invalid one) and once in the flow run, shared by
    run_start's layers and the flow body; every step carries its layer."""
    from prefect_ws.workflow import runner

    loads: list[str] = []
    real_load = runner.load_workflow

    def counting_load(definition: Any, **kwargs: Any) -> Any:
        loads.append(type(definition).__name__)
        return real_load(definition, **kwargs)

    monkeypatch.setattr(runner, "load_workflow", counting_load)
    runner._load_mapping.cache_clear()  # an identical earlier run in this process would share it
    definition = {
        "id": "load-once",
        "steps": [
            {"id": "a", "run": f"{HERE}:nap", "params": {"seconds": 0}},
            {"id": "b", "run": f"{HERE}:nap", "needs": ["a"], "params": {"seconds": 0}},
        ],
    }
    result, client = run_watched(hub, definition)
    assert result.ok
    assert loads == ["dict", "dict"]
    assert client.events[0]["payload"]["layers"] == [["a"], ["b"]]
    layers = {
        e["payload"]["stepId"]: e["payload"]["layer"]
        for e in client.events
        if e["type"] == "step_start"
    }
    assert layers == {"a": 0, "b": 1}


def test_print_in_parallel_steps_is_always_streamed(hub: str) -> None:
    """Prefect patches builtins.print per task; a task that ends first must not un-patch it for a
    step still running (regression: 'late' printed to the terminal instead of the stream)."""
    definition = {
        "id": "parallel-prints",
        "steps": [
            {"id": "early", "run": f"{HERE}:say", "params": {"text": "early", "delay": 0}},
            {"id": "late", "run": f"{HERE}:say", "params": {"text": "late", "delay": 0.5}},
        ],
    }
    result, client = run_watched(hub, definition)
    assert result.ok
    assert_run_sequence(client.events, {"early": ["early"], "late": ["late"]})


# -- shell steps ----------------------------------------------------------------------------------
def test_shell_lines_arrive_while_the_step_runs(hub: str) -> None:
    result, client = run_watched(hub, EXAMPLES / "shell.yaml", {"greeting": "hi"})
    events = client.events
    assert result.ok
    hello = next(
        i for i, e in enumerate(events) if e["payload"].get("message") == "hi from step greet"
    )
    done = client.index("step_complete", "greet")
    # printed, then a 1 s sleep: the client had the line long before the step finished
    assert client.arrived[done] - client.arrived[hello] >= 0.8
    assert client.index("step_start", "greet") < hello < done
    logs = {
        (e["payload"]["stepId"], e["payload"]["message"]): e["payload"]["level"]
        for e in events
        if e["type"] == "step_log"
    }
    assert logs == {
        ("greet", "hi from step greet"): "INFO",
        ("greet", "greet done"): "INFO",
        ("count", "line 1"): "INFO",
        ("count", "line 2"): "INFO",
        ("count", "line 3"): "INFO",
        ("count", "a warning on stderr"): "WARNING",
        ("summarize", "summary: greet said 'hi from step greet'"): "INFO",
        ("summarize", "count printed 3 lines"): "INFO",
    }
    assert_run_sequence(
        events,
        {
            "greet": ["hi from step greet", "greet done"],
            "count": ["line 1", "line 2", "line 3", "a warning on stderr"],
            "summarize": ["summary: greet said 'hi from step greet'", "count printed 3 lines"],
        },
    )
    assert result.results is not None and result.results["count"] == "line 1\nline 2\nline 3"


def test_shell_failure_and_timeout(hub: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "sleeper.pid"
    definition = {
        "id": "shell-failures",
        "steps": [
            {"id": "exits", "shell": "echo one; echo two >&2; exit 3"},
            {
                "id": "hangs",
                "shell": f"echo $$ > {pid_file}; echo started; sleep 30",
                "timeout_seconds": 1,
            },
            {"id": "after_exit", "needs": ["exits"], "shell": "echo never"},
            {"id": "fine", "shell": "printf 'no newline at the end'"},
        ],
    }
    began = time.monotonic()
    result, client = run_watched(hub, definition)
    assert time.monotonic() - began < 10
    completes = {s: e["payload"] for s, e in by_step(client.events, "step_complete").items()}
    assert completes["exits"]["status"] == "failed"
    assert completes["exits"]["error"] == (
        "ShellStepError: command failed with exit code 3; last lines:\none\ntwo"
    )
    assert completes["hangs"]["status"] == "failed"
    assert completes["hangs"]["error"] == (
        "ShellStepError: timed out after 1s; process killed; last lines:\nstarted"
    )
    assert 1.0 <= completes["hangs"]["duration"] < 5
    assert completes["after_exit"]["status"] == "skipped"
    assert completes["after_exit"]["reason"] == "upstream step 'exits' failed"
    assert completes["fine"]["status"] == "completed"
    fine_logs = [
        e["payload"]["message"]
        for e in client.events
        if e["type"] == "step_log" and e["payload"]["stepId"] == "fine"
    ]
    assert fine_logs == ["no newline at the end"]
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the timed-out shell was killed, not left behind
    assert result.status == "failed"
    assert sorted(client.events[-1]["payload"]["failedSteps"]) == ["exits", "hangs"]


def test_python_step_timeouts(hub: str) -> None:
    """Async steps are cancelled at the deadline; a sync step fails once it returns (a Python
    thread cannot be stopped) with Prefect's timeout error, and its dependants are skipped."""
    definition = {
        "id": "python-timeouts",
        "steps": [
            {
                "id": "async_slow",
                "run": f"{HERE}:async_nap",
                "params": {"seconds": 30},
                "timeout_seconds": 0.5,
            },
            {
                "id": "sync_slow",
                "run": f"{HERE}:nap",
                "params": {"seconds": 1.5},
                "timeout_seconds": 0.5,
            },
            {"id": "after", "run": f"{HERE}:nap", "needs": ["sync_slow"], "params": {"seconds": 0}},
        ],
    }
    began = time.monotonic()
    result, client = run_watched(hub, definition)
    assert time.monotonic() - began < 8
    completes = {s: e["payload"] for s, e in by_step(client.events, "step_complete").items()}
    assert completes["async_slow"]["status"] == "failed"
    # ours ("TimeoutError: timed out after 0.5s; cancelled") or Prefect's, whichever fires first
    assert "TimeoutError" in completes["async_slow"]["error"]
    assert "0.5" in completes["async_slow"]["error"]
    assert completes["async_slow"]["duration"] < 1.5
    assert completes["sync_slow"]["status"] == "failed"
    assert completes["sync_slow"]["error"].startswith("TaskRunTimeoutError")
    assert completes["after"]["status"] == "skipped"
    assert result.status == "failed"


# -- scale ----------------------------------------------------------------------------------------
def test_200_step_random_dag(hub: str) -> None:
    rng = random.Random(20261129)
    steps: list[dict[str, Any]] = []
    for i in range(200):
        earlier = [f"s{j:03d}" for j in range(max(0, i - 25), i)]
        needs = rng.sample(earlier, k=min(len(earlier), rng.randint(0, 3)))
        steps.append({"id": f"s{i:03d}", "run": f"{HERE}:count_inputs", "needs": needs})
    rng.shuffle(steps)  # definition order need not be topological
    definition = {"id": "random-200", "steps": steps}
    graph = {s["id"]: s["needs"] for s in steps}

    began = time.monotonic()
    result, client = run_watched(hub, definition)
    elapsed = time.monotonic() - began
    events = client.events
    assert result.ok, result.error
    assert_run_sequence(
        events, {s["id"]: [f"{s['id']} got {len(s['needs'])} inputs"] for s in steps}
    )
    assert events[0]["payload"]["layers"] == dag.layers(graph)
    starts, completes = by_step(events, "step_start"), by_step(events, "step_complete")
    assert len(starts) == len(completes) == 200
    assert all(c["payload"]["status"] == "completed" for c in completes.values())
    layer_of = {s: i for i, layer in enumerate(dag.layers(graph)) for s in layer}
    position = {id(e): i for i, e in enumerate(events)}
    for step, needs in graph.items():
        assert starts[step]["payload"]["layer"] == layer_of[step]
        for need in needs:  # every step started after each of its needs completed
            assert position[id(completes[need])] < position[id(starts[step])]
    assert events[-1]["payload"]["steps"]["completed"] == 200
    print(f"200-step DAG: {len(events)} events, {elapsed:.2f} s")


# -- step functions for the inline workflows above ------------------------------------------------
def flaky(marker: str, failures: int) -> int:
    """Fails ``failures`` times (counting attempts in a file), then returns the attempt number."""
    from prefect import get_run_logger

    path = Path(marker)
    attempt = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempt))
    get_run_logger().info("attempt %d", attempt)
    if attempt <= failures:
        raise RuntimeError(f"attempt {attempt} failed")
    return attempt


def echo(flaky: int) -> int:
    return flaky


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def count_inputs(upstream: dict[str, Any]) -> int:
    from prefect import get_run_logger
    from prefect.runtime import task_run

    get_run_logger().info("%s got %d inputs", task_run.name, len(upstream))
    return len(upstream)


async def async_nap(seconds: float) -> float:
    import asyncio

    await asyncio.sleep(seconds)
    return seconds


def say(text: str, delay: float) -> str:
    time.sleep(delay)
    print(text)
    return text
