"""The embedded memory:// backend: flow, publisher and server in one process."""

from __future__ import annotations

import asyncio
import threading

import pytest
from helpers import StreamRecorder, assert_run_sequence, create_flow_run, stream_path
from sample_flows import FOUR_STEPS_LOGS, four_steps

from prefect_ws.publish.publisher import reset_publisher
from prefect_ws.server.uvicorn.config import serve_in_thread
from prefect_ws.settings import Settings


def _run_in_thread(run_id: str, results: dict) -> threading.Thread:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    def target() -> None:
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(UUID(run_id))
        results["state"] = run_flow(
            four_steps, flow_run=flow_run, parameters={"fail": False}, return_type="state"
        )

    thread = threading.Thread(target=target)
    thread.start()
    return thread


@pytest.fixture
def memory_url(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    url = f"memory://{request.node.name}"
    monkeypatch.setenv("PREFECT_WS_BROADCAST_URL", url)
    reset_publisher()  # the process-wide publisher reads the setting on first use
    return url


def test_memory_backend_streams_live_and_replays_to_late_joiners(
    prefect_api: str, memory_url: str
) -> None:
    run_id = create_flow_run(four_steps, {"fail": False})
    results: dict = {}
    with serve_in_thread(Settings(broadcast_url=memory_url)) as base_url:

        async def scenario() -> tuple[StreamRecorder, StreamRecorder]:
            live = StreamRecorder(base_url + stream_path(run_id))
            task = asyncio.create_task(live.run())
            await live.connected.wait()
            thread = await asyncio.to_thread(_run_in_thread, run_id, results)
            await asyncio.to_thread(thread.join, 60)
            await task
            late = StreamRecorder(base_url + stream_path(run_id, wait=None))
            await late.run()
            return live, late

        live, late = asyncio.run(scenario())

    assert results["state"].is_completed()
    assert_run_sequence(live.events, FOUR_STEPS_LOGS)
    assert late.frames == live.frames, "a late joiner replays the identical bytes"
    assert late.hello is not None and late.hello["head"] == len(live.frames)
    assert late.close_code == 1000


def test_engine_lines_are_opt_in_and_run_complete_stays_last(
    prefect_api: str, memory_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_WS_INCLUDE_ENGINE_LOGS", "true")
    reset_publisher()
    run_id = create_flow_run(four_steps, {"fail": False})
    results: dict = {}
    _run_in_thread(run_id, results).join(60)
    with serve_in_thread(Settings(broadcast_url=memory_url)) as base_url:
        recorder = StreamRecorder(base_url + stream_path(run_id, wait=None))
        asyncio.run(recorder.run())
    events = recorder.events
    messages = [e["payload"]["message"] for e in events if e["type"] == "step_log"]
    assert any(m.startswith("Finished in state Completed") for m in messages)
    assert events[-1]["type"] == "run_complete"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
