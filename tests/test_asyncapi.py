"""docs/asyncapi.yaml against reality: frames captured from real runs must match its schemas."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import (
    StreamRecorder,
    create_flow_run,
    publisher_env,
    run_flow_in_subprocess,
    stream_path,
)
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from sample_flows import four_steps

from prefect_ws.protocol import closecodes
from prefect_ws.protocol.events import EVENT_TYPES
from prefect_ws.server.uvicorn.config import serve_in_thread
from prefect_ws.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOC_URI = "urn:prefect-ws:asyncapi"
SCHEMA_OF = {
    "run_start": "RunStart",
    "run_attempt": "RunAttempt",
    "step_start": "StepStart",
    "step_log": "StepLog",
    "step_complete": "StepComplete",
    "run_complete": "RunComplete",
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())
    return loaded


def validator(document: dict[str, Any], name: str) -> Draft202012Validator:
    registry: Registry = Registry().with_resource(
        DOC_URI, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    return Draft202012Validator(
        {"$ref": f"{DOC_URI}#/components/schemas/{name}"},
        registry=registry,
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


def assert_valid(document: dict[str, Any], frames: list[str]) -> set[tuple[str, str]]:
    """Each frame validates against its type's schema and against Event; returns what was seen."""
    event = validator(document, "Event")
    seen: set[tuple[str, str]] = set()
    for text in frames:
        data = json.loads(text)
        if data.get("type") == "hello":
            validator(document, "Hello").validate(data)
            continue
        validator(document, SCHEMA_OF[data["type"]]).validate(data)
        event.validate(data)
        seen.add((data["type"], str(data["payload"].get("status", ""))))
    return seen


def test_document_covers_the_protocol(document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"
    addresses = {c["address"] for c in document["channels"].values()}
    assert addresses == {
        "/api/v2/workflows/runs/{runId}/stream",
        "/api/v2/workflows/runs/{runId}/events/stream",
    }
    names = {m["name"] for m in document["components"]["messages"].values()}
    assert names == {*EVENT_TYPES, "hello", "end"}
    assert {"bearer", "tokenQuery", "tokenSubprotocol"} <= set(
        document["components"]["securitySchemes"]
    )
    query = document["components"]["schemas"]["StreamQuery"]["properties"]
    assert {"since", "token"} <= set(query)
    documented = {int(code) for code in document["info"]["x-close-codes"]}
    ours = {v for k, v in vars(closecodes).items() if k.isupper() and isinstance(v, int)}
    assert ours <= documented, f"undocumented close codes: {ours - documented}"


def test_schemas_reject_what_the_protocol_forbids(document: dict[str, Any]) -> None:
    good: dict[str, Any] = {
        "v": 1, "type": "step_log", "runId": "0b6c3e4e-1a2b-4c5d-8e9f-0a1b2c3d4e5f", "seq": 1,
        "ts": "2026-11-29T00:31:02.123456Z",
        "payload": {"stepId": None, "taskRunId": None, "level": "INFO", "message": "m",
                    "logger": "prefect.flow_runs"},
    }  # fmt: skip
    check = validator(document, "StepLog")
    check.validate(good)
    for broken in (
        {**good, "seq": 0},
        {**good, "v": 2},
        {**good, "extra": 1},
        {**good, "ts": "yesterday"},
        {**good, "payload": {**good["payload"], "level": "LOUD"}},
        {**good, "payload": {k: v for k, v in good["payload"].items() if k != "message"}},
    ):
        assert not check.is_valid(broken), broken


async def _capture_four_steps(base: str, settings: Settings, run_id: str) -> list[str]:
    client = StreamRecorder(base + stream_path(run_id))
    task = asyncio.create_task(client.run(timeout=90))
    await client.connected.wait()
    env = publisher_env(settings)
    await run_flow_in_subprocess("sample_flows:four_steps", run_id, {"fail": True}, env=env)
    await task
    assert client.close_code == 1000
    return client.frames


def _run_failing_workflow(base: str, settings: Settings) -> str:
    env = {**os.environ, **publisher_env(settings)}
    done = subprocess.run(
        [sys.executable, "-c", "from prefect_ws.cli.main import main; main()", "run",
         "examples/failing.yaml", "--url", base],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    match = re.search(r"^run id: (\S+)$", done.stdout, re.MULTILINE)
    assert match, done.stdout
    return match.group(1)


def test_real_frames_match_the_schemas(
    document: dict[str, Any], prefect_api: str, redis_url: str, redis_prefix: str
) -> None:
    settings = Settings(broadcast_url=redis_url, redis_prefix=redis_prefix, log_level="WARNING")
    run_id = create_flow_run(four_steps, {"fail": True})
    with serve_in_thread(settings) as base:
        live = asyncio.run(_capture_four_steps(base, settings, run_id))
        workflow_run = _run_failing_workflow(base, settings)
        replay = StreamRecorder(base + stream_path(workflow_run))
        asyncio.run(replay.run(timeout=30))
        http = base.replace("ws://", "http://", 1)
        sse = httpx.get(f"{http}/api/v2/workflows/runs/{workflow_run}/events/stream", timeout=30)

    seen = assert_valid(document, live) | assert_valid(document, replay.frames)
    assert {
        ("run_start", ""),
        ("step_start", ""),
        ("step_log", ""),
        ("step_complete", "completed"),
        ("step_complete", "failed"),
        ("step_complete", "skipped"),
        ("run_complete", "failed"),
    } <= seen
    skipped = [
        json.loads(f) for f in replay.frames if '"status":"skipped"' in f and "step_complete" in f
    ]
    assert skipped and all("reason" in s["payload"] for s in skipped)
    layers = json.loads(replay.frames[0] if '"run_start"' in replay.frames[0] else replay.frames[1])
    assert layers["payload"]["layers"][0] == ["extract"]

    # The SSE stream of the same run: hello, the identical events with id = seq, then end.
    assert sse.status_code == 200
    assert sse.headers["content-type"].startswith("text/event-stream")
    messages = parse_sse(sse.text)
    assert [name for name, _, _ in messages][:1] == ["hello"]
    assert [name for name, _, _ in messages][-1] == "end"
    validator(document, "Hello").validate(json.loads(messages[0][2]))
    end = json.loads(messages[-1][2])
    validator(document, "SseEnd").validate(end)
    assert end == {"code": 1000, "reason": "run complete"}
    events = messages[1:-1]
    assert all(name == "message" for name, _, _ in events)
    assert [data for _, _, data in events] == replay.frames
    assert [int(i or 0) for _, i, _ in events] == [json.loads(d)["seq"] for _, _, d in events]
    assert_valid(document, [data for _, _, data in events])


def parse_sse(text: str) -> list[tuple[str, str | None, str]]:
    """(event name, id, data) of each SSE message; comments and `retry:` are skipped."""
    messages = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "data" in fields:
            messages.append((fields.get("event", "message"), fields.get("id"), fields["data"]))
    return messages
