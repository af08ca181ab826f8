"""Real deployments: runs started by Prefect (a runner from ``flow.serve()``, a ``process``
worker), triggered through Prefect's API and streamed by ``prefect-ws serve`` from before they
start to the end Prefect records, with no prefect-ws code in the flow (the plugin streams it).

Each stream keeps every invariant of a decorated flow's (one unbroken ``seq`` range, each step's
logs inside it, a single ``run_complete`` of Prefect's status last, then close 1000), whether the
flow's process ended the run or the server did from Prefect's record after the process was killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from delivery_support import VENV_BIN, ServerProcess, servers
from helpers import TESTS, StreamRecorder, assert_run_sequence, stream_path

PLAIN_LOGS: dict[str | None, list[str]] = {"plain-work": ["plain work started"]}


def flow_env(redis_url: str, redis_prefix: str) -> dict[str, str]:
    """What a flow run needs to stream: the backend and the plugin (docs/deployments.md)."""
    return {
        "PREFECT_WS_BROADCAST_URL": redis_url,
        "PREFECT_WS_REDIS_PREFIX": redis_prefix,
        "PREFECT_PLUGINS_ENABLED": "true",
    }


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running Prefect process (runner, worker), stopped at the end of the block."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args,
            cwd=TESTS,
            env={**os.environ, "PYTHONPATH": f"{TESTS}:{os.environ.get('PYTHONPATH', '')}", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its flow-run processes are stopped with it
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)


def wait_for_deployment(name: str, proc: subprocess.Popen[bytes], log: Path) -> uuid.UUID:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"exited {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                return client.read_deployment_by_name(name).id
            except ObjectNotFound:
                time.sleep(0.2)
    raise AssertionError(f"deployment {name} not registered: {log.read_text()[-3000:]}")


def trigger(deployment_id: uuid.UUID, **parameters: Any) -> str:
    """Create a run of the deployment through Prefect's API, as the UI or an automation would."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.create_flow_run_from_deployment(deployment_id, parameters=parameters).id)


def crashed_at(run_id: str) -> float:
    """When Prefect recorded the run's current (Crashed) state, epoch seconds."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(uuid.UUID(run_id)).state
    assert state is not None and state.type.value == "CRASHED", state
    return state.timestamp.timestamp()


def assert_reconciled_stream(client: StreamRecorder, status: str) -> None:
    assert (client.close_code, client.close_reason) == (1000, "run complete")
    events = client.events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events].count("run_complete") == 1
    assert events[-1]["type"] == "run_complete"
    assert events[-1]["payload"]["status"] == status
    # A deployment's runner logs its pull steps for the run before the flow starts.
    run_level = [e["payload"]["message"] for e in events if e["type"] == "step_log"]
    run_level = [m for m in run_level if "deployment" in m.lower()]
    expected = {**PLAIN_LOGS, None: run_level} if run_level else PLAIN_LOGS
    assert_run_sequence(events, expected, preamble=True)


async def until(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


def test_served_flow_killed_mid_run_ends_crashed_and_tail_fails(
    prefect_api: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    name = f"killed-{uuid.uuid4().hex[:8]}"
    pid_file = tmp_path / "flow.pid"
    runner_env = {**flow_env(redis_url, redis_prefix), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}

    async def main(
        server: ServerProcess, deployment_id: uuid.UUID
    ) -> tuple[StreamRecorder, int, float]:
        run_id = trigger(deployment_id, seconds=120, pid_file=str(pid_file))
        # Connected before the run starts, without wait=: Prefect knows the run.
        client = StreamRecorder(server.base + stream_path(run_id, wait=None))
        watching = asyncio.create_task(client.run(timeout=120))
        tail = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "prefect-ws"),
            "tail",
            run_id,
            "--url",
            server.base,
            "--json",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await until(lambda: client.hello is not None, "hello")
        assert client.hello is not None and client.hello.get("waiting") in ("Scheduled", "Pending")
        await until(lambda: pid_file.exists() and pid_file.read_text(), "flow process started")
        await until(lambda: any(e["type"] == "step_log" for e in client.events), "a log line")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        await watching
        after = time.time() - crashed_at(run_id)
        code = await asyncio.wait_for(tail.wait(), 30)
        return client, code, after

    with (
        process(
            [sys.executable, "serve_flows.py", name],
            runner_env,
            tmp_path / "runner.log",
        ) as runner,
        servers(redis_url, redis_prefix, 1) as (server,),
    ):
        deployment_id = wait_for_deployment(
            f"reconcile-plain/{name}", runner, tmp_path / "runner.log"
        )
        client, tail_code, after = asyncio.run(main(server, deployment_id))
        log = server.stop()

    assert "Traceback" not in log, log[-3000:]
    assert_reconciled_stream(client, "crashed")
    assert "status code: -9" in client.events[-1]["payload"]["error"]
    assert tail_code == 1  # prefect-ws tail: the run failed
    print(f"crashed: run_complete reached the client {after:.2f} s after Prefect recorded it")
    assert after < 5.0


def test_worker_runs_a_deployment_streamed_to_its_end(
    prefect_api: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from reconcile_flows import plain_sleeper

    pool = f"pool-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    # The deployment's job variables give its runs what they need to stream.
    # from_source returns the flow here (a coroutine only inside an event loop).
    source = cast(Any, plain_sleeper.from_source)(
        source=str(TESTS), entrypoint="reconcile_flows.py:plain_sleeper"
    )
    deployment_id: uuid.UUID = source.deploy(
        name=f"worker-{pool}",
        work_pool_name=pool,
        job_variables={"env": flow_env(redis_url, redis_prefix)},
        print_next_steps=False,
    )

    async def main(server: ServerProcess) -> StreamRecorder:
        run_id = trigger(deployment_id, seconds=0.2)
        recorder = StreamRecorder(server.base + stream_path(run_id, wait=None))
        await recorder.run(timeout=120)
        return recorder

    worker_env = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    with (
        process(
            [str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
            worker_env,
            tmp_path / "worker.log",
        ),
        servers(redis_url, redis_prefix, 1) as (server,),
    ):
        recorder = asyncio.run(main(server))
        log = server.stop()

    assert "Traceback" not in log, log[-3000:]
    assert recorder.hello is not None and recorder.hello.get("waiting") in ("Scheduled", "Pending")
    assert_reconciled_stream(recorder, "completed")
    assert any(e["type"] == "step_log" for e in recorder.events), recorder.events
