"""The web pages in a real headless Chromium (Debian's), driven by Playwright, against real runs.

Workflows run in this process through the runner (``memory://``, like ``prefect-ws demo``), in a
background thread; the browser is driven from the test thread. ``on_start`` holds the run until
the page is open, so the page sees it live from its first event.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import stream_path
from websockets.asyncio.client import connect

from prefect_ws.server.uvicorn.config import serve_in_thread
from prefect_ws.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does it)",
)
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DEMO = ROOT / "prefect_ws" / "workflow" / "examples" / "diamond.yaml"  # what `prefect-ws demo` runs
SCREENSHOT = ROOT / "docs" / "screenshot-run.png"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))
    page.errors = errors
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


@pytest.fixture
def server(prefect_api: str) -> Iterator[str]:
    """The app on memory://, in this process: the runner's publisher shares its store."""
    with serve_in_thread(Settings(broadcast_url="memory://", log_level="WARNING")) as base_url:
        yield base_url.replace("ws://", "http://")


class Recorder:
    """A reference WebSocket client in a thread: every event, to compare with the page."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[dict[str, Any]] = []
        self.connected = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()
        assert self.connected.wait(10), "reference client did not connect"

    async def _run(self) -> None:
        async with asyncio.timeout(120), connect(self.url, compression=None) as websocket:
            self.connected.set()
            async for message in websocket:
                event = json.loads(message)
                if "seq" in event:
                    self.events.append(event)

    def join(self) -> list[dict[str, Any]]:
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self.events


class BackgroundWorkflow:
    """``run_workflow`` in a thread; the run waits in ``on_start`` until the test says go."""

    def __init__(self, definition: Path | dict[str, Any], **options: Any) -> None:
        self.run_id: str | None = None
        self.started = threading.Event()
        self.go = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(definition,), kwargs=options, daemon=True
        )
        self.thread.start()
        assert self.started.wait(60), "the workflow run was not created"

    def _on_start(self, run_id: str, flow_run_name: str) -> None:
        self.run_id = run_id
        self.started.set()
        self.go.wait(30)

    def _run(self, definition: Path | dict[str, Any], **options: Any) -> None:
        from prefect_ws.workflow import run_workflow

        try:
            self.result = run_workflow(definition, on_start=self._on_start, **options)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> Any:
        self.go.set()
        self.thread.join(90)
        assert not self.thread.is_alive(), "workflow did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def _steps(page: Any) -> dict[str, tuple[str, str, str]]:
    """stepId -> (status, layer, duration text), as the DAG shows it."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('.step')].map(s => [
            s.dataset.step,
            [s.dataset.status, s.closest('.layer').dataset.layer,
             s.querySelector('.step-duration').textContent]]))"""
    )


def _visible_logs(page: Any) -> list[tuple[str, str, str]]:
    return [tuple(line) for line in _evaluate_logs(page)]  # type: ignore[misc]


def _log_seqs(page: Any) -> list[int]:
    return list(
        page.evaluate("() => [...document.querySelectorAll('.log-line')].map(l => +l.dataset.seq)")
    )


def _evaluate_logs(page: Any) -> list[list[str]]:
    return page.evaluate(
        """() => [...document.querySelectorAll('.log-line')].filter(l => !l.hidden).map(l => [
            l.querySelector('.log-level').textContent, l.querySelector('.log-step').textContent,
            l.querySelector('.log-message').textContent])"""
    )


def test_run_page_shows_a_workflow_live_then_finished(
    server: str, page: Any, tmp_path: Path
) -> None:
    workflow = BackgroundWorkflow(DEMO)
    run_id = workflow.run_id
    assert run_id
    reference = Recorder(server.replace("http://", "ws://") + stream_path(run_id))
    page.goto(f"{server}/runs/{run_id}")
    # Unknown to the server so far: the page says so, clearly, and keeps waiting.
    # Created in Prefect, not started: the page says it waits for the run to start.
    page.wait_for_selector('#notice[data-kind="waiting"]', timeout=WAIT_MS)
    assert "Waiting for the run to start (Prefect state: Pending)" in page.inner_text("#notice")
    assert page.get_attribute("#connection", "data-state") == "waiting"
    workflow.go.set()

    # Live: a step is seen running (spinner) before the run finishes.
    page.wait_for_selector('.step[data-status="running"]', timeout=WAIT_MS)
    assert page.get_attribute("#run-status", "data-status") == "running"
    assert page.is_hidden("#notice")
    result = workflow.finish()
    assert result.status == "completed"
    page.wait_for_selector('#run-status[data-status="completed"]', timeout=WAIT_MS)
    events = reference.join()

    steps = _steps(page)
    assert {s: (st, layer) for s, (st, layer, _) in steps.items()} == {
        "extract": ("completed", "0"),
        "transform_sum": ("completed", "1"),
        "transform_max": ("completed", "1"),
        "load": ("completed", "2"),
    }
    assert all(duration.endswith("s") for _, _, duration in steps.values())
    assert page.inner_text("#progress-text") == "4/4 steps finished"
    assert page.inner_text("#flow-name") == "prefect-ws-demo"
    assert page.inner_text("#run-duration").endswith("s")

    # Every log line of the stream, in seq order, with its level and step.
    stream_logs = [
        (e["payload"]["level"], e["payload"]["stepId"] or "flow", e["payload"]["message"])
        for e in events
        if e["type"] == "step_log"
    ]
    assert len(stream_logs) >= 8
    assert _visible_logs(page) == stream_logs
    seqs = _log_seqs(page)
    assert seqs == [e["seq"] for e in events if e["type"] == "step_log"]
    assert page.inner_text("#last-seq") == str(events[-1]["seq"])
    assert any(level == "WARNING" for level, _, _ in stream_logs)

    # The finished run, as README shows it (before any filter is touched).
    # docs/ keeps one (README shows it); it is rewritten only when missing or asked for, so a
    # test run leaves the working tree clean.
    refresh = not SCREENSHOT.exists() or os.environ.get("PREFECT_WS_UPDATE_SCREENSHOT") == "1"
    shot = SCREENSHOT if refresh else tmp_path / SCREENSHOT.name
    shot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000 and SCREENSHOT.exists()

    # Filters: level, step (select and clicking a step), text; clearing brings all back.
    page.select_option("#level-filter", "WARNING")
    assert _visible_logs(page) == [x for x in stream_logs if x[0] in ("WARNING", "ERROR")]
    page.select_option("#level-filter", "DEBUG")
    page.click('.step[data-step="transform_sum"]')
    assert page.input_value("#step-filter") == "transform_sum"
    assert _visible_logs(page) == [x for x in stream_logs if x[1] == "transform_sum"]
    page.click('.step[data-step="transform_sum"]')  # toggles back to all steps
    page.fill("#text-filter", "rows")
    assert _visible_logs(page) == [x for x in stream_logs if "rows" in x[2].lower()]
    page.fill("#text-filter", "")
    assert _visible_logs(page) == stream_logs

    # Auto-scroll kept the newest line in view.
    at_bottom = page.evaluate(
        "() => { const l = document.getElementById('logs');"
        " return l.scrollHeight - l.scrollTop - l.clientHeight < 40; }"
    )
    assert at_bottom
    # The Prefect UI link (PREFECT_UI_URL, derived by Prefect from PREFECT_API_URL here).
    from prefect.settings import get_current_settings

    ui = str(get_current_settings().ui_url).rstrip("/")
    assert page.get_attribute("#prefect-link", "href") == f"{ui}/runs/flow-run/{run_id}"
    assert page.is_visible("#prefect-link")
    assert page.get_attribute("#connection", "data-state") == "done"


def test_failing_workflow_shows_the_failed_and_skipped_steps(server: str, page: Any) -> None:
    workflow = BackgroundWorkflow(EXAMPLES / "failing.yaml")
    page.goto(f"{server}/runs/{workflow.run_id}")
    page.wait_for_selector('#notice[data-kind="waiting"]', timeout=WAIT_MS)  # subscribed
    result = workflow.finish()
    assert result.status == "failed"
    page.wait_for_selector('#run-status[data-status="failed"]', timeout=WAIT_MS)
    steps = _steps(page)
    assert {s: (st, layer) for s, (st, layer, _) in steps.items()} == {
        "extract": ("completed", "0"),
        "validate": ("failed", "1"),
        "archive": ("completed", "1"),
        "report": ("skipped", "2"),
        "publish": ("skipped", "3"),
    }
    error = page.inner_text('.step[data-step="validate"] .step-error')
    assert error.startswith("ValueError:") and "above 50" in error
    assert "validate" in page.inner_text("#run-error")
    assert page.inner_text("#progress-text") == "5/5 steps finished"
    assert ("INFO", "validate", "checked 20 rows against max_value=50") in _visible_logs(page)


def test_reconnect_resumes_with_since_and_loses_nothing(server: str, page: Any) -> None:
    from test_tail import CuttingProxy

    port = int(server.rsplit(":", 1)[1])
    workflow = BackgroundWorkflow(DEMO)
    run_id = workflow.run_id
    assert run_id
    reference = Recorder(server.replace("http://", "ws://") + stream_path(run_id))
    sockets: list[str] = []
    page.on("websocket", lambda socket: sockets.append(socket.url))
    with CuttingProxy(port) as proxy:
        page.goto(f"http://127.0.0.1:{proxy.port}/runs/{run_id}")
        page.wait_for_selector('#notice[data-kind="waiting"]', timeout=WAIT_MS)
        workflow.go.set()
        page.wait_for_selector('.step[data-status="running"]', timeout=WAIT_MS)
        seen_before_cut = int(page.inner_text("#last-seq"))
        proxy.cut()
        workflow.finish()
        page.wait_for_selector('#run-status[data-status="completed"]', timeout=WAIT_MS)
        connections = proxy.connections
    events = reference.join()
    assert 0 < seen_before_cut < events[-1]["seq"]
    assert connections >= 2  # the page (and its static files) came back through the proxy
    # The first stream waited for the run; the one after the cut resumed after what it had.
    assert len(sockets) == 2 and sockets[0].endswith("/stream?wait=60"), sockets
    resumed_since = int(sockets[1].rsplit("since=", 1)[1])
    assert seen_before_cut <= resumed_since < events[-1]["seq"]
    seqs = _log_seqs(page)
    assert seqs == [e["seq"] for e in events if e["type"] == "step_log"]  # no gap, no repeat
    assert page.inner_text("#last-seq") == str(events[-1]["seq"])
    assert all(status == "completed" for status, _, _ in _steps(page).values())


def test_index_lists_active_then_recent_runs_live(server: str, page: Any) -> None:
    page.goto(f"{server}/")
    page.wait_for_selector('#connection[data-state="live"]', timeout=WAIT_MS)
    # The examples' diamond with 3 s transforms: long enough to be seen among the active runs.
    definition = yaml.safe_load((EXAMPLES / "diamond.yaml").read_text())
    for step in definition["steps"]:
        if step["id"].startswith("transform_"):
            step["params"] = {"seconds": 3.0}
    workflow = BackgroundWorkflow(definition, base_dir=EXAMPLES)
    run_id = workflow.run_id
    workflow.go.set()
    active = f'#active-runs tr[data-run="{run_id}"][data-status="running"]'
    page.wait_for_selector(active, timeout=WAIT_MS)
    assert "diamond-etl" in page.inner_text(active)
    workflow.finish()
    row = f'#recent-runs tr[data-run="{run_id}"][data-status="completed"]'
    page.wait_for_selector(row, timeout=WAIT_MS)
    assert page.locator(f'#active-runs tr[data-run="{run_id}"]').count() == 0
    assert "diamond-etl" in page.inner_text(row)
    # The row links to the run page, which replays the finished run.
    page.click(f"{row} a")
    page.wait_for_selector('#run-status[data-status="completed"]', timeout=WAIT_MS)
    assert page.url.endswith(f"/runs/{run_id}")

    listing = httpx.get(f"{server}/api/v2/workflows/runs", params={"limit": 5}).json()
    mine = next(r for r in listing["runs"] if r["runId"] == run_id)
    assert mine["status"] == "completed" and mine["flowName"] == "diamond-etl"
    assert mine["seq"] >= 10 and mine["page"] == f"/runs/{run_id}"
    for bad in ("0", "201", "-1", "abc", "1e3", "9" * 30):
        answer = httpx.get(f"{server}/api/v2/workflows/runs", params={"limit": bad})
        assert answer.status_code == 400 and "invalid limit" in answer.json()["error"]


def test_unknown_and_malformed_run_ids_and_hostile_page_urls(server: str, page: Any) -> None:
    unknown = str(uuid.uuid4())
    page.goto(f"{server}/runs/{unknown}")
    page.wait_for_selector('#notice[data-kind="waiting"]', timeout=WAIT_MS)
    assert f"Unknown run: this server has no events for run {unknown}" in page.inner_text("#notice")
    assert page.get_attribute("#connection", "data-state") == "waiting"

    for raw in (
        "not-a-run",
        "<script>alert(1)</script>",
        "1%27%22%3E%3Cimg%20src=x%20onerror=alert(1)%3E",
        "a" * 300,
        "..%2F..%2Fetc%2Fpasswd",
    ):
        response = page.goto(f"{server}/runs/{raw}")
        assert response is not None and response.status == 400, raw
        assert page.inner_text("h1") == "Invalid run id"
        assert "expected a UUID" in page.inner_text("#error-message")
        assert page.locator("img").count() == 0 and page.locator("body script").count() == 0
    # Query values are data, not markup: nothing the URL carries is executed.
    page.goto(f"{server}/runs/{unknown}?token=%3C/script%3E%3Cscript%3Ealert(1)%3C/script%3E")
    page.wait_for_selector("#connection[data-state]", timeout=WAIT_MS)
    assert page.inner_text("#run-id") == unknown


def test_refused_access_is_explained(prefect_api: str, page: Any) -> None:
    from prefect_ws.server.security.auth import mint_token

    secret = "web-" + uuid.uuid4().hex
    settings = Settings(broadcast_url="memory://", log_level="WARNING", token_secret=secret)
    run_id = str(uuid.uuid4())
    with serve_in_thread(settings) as base_url:
        server = base_url.replace("ws://", "http://")
        page.goto(f"{server}/runs/{run_id}")
        page.wait_for_selector('#connection[data-state="refused"]', timeout=WAIT_MS)
        assert "Access refused: this server needs a token" in page.inner_text("#notice")

        other = mint_token(str(uuid.uuid4()), secret=secret, ttl=60)
        page.goto(f"{server}/runs/{run_id}?token={other}")
        page.wait_for_selector('#connection[data-state="refused"]', timeout=WAIT_MS)
        assert "Access refused: token not valid for this run" in page.inner_text("#notice")

        good = mint_token(run_id, secret=secret, ttl=60)
        page.goto(f"{server}/runs/{run_id}?token={good}")
        page.wait_for_selector('#notice[data-kind="waiting"]', timeout=WAIT_MS)  # let in
        page.goto(f"{server}/")  # the index needs an admin token
        page.wait_for_selector('#connection[data-state="refused"]', timeout=WAIT_MS)
        assert "Access refused" in page.inner_text("#notice")
        admin = mint_token("*", secret=secret, ttl=60)
        page.goto(f"{server}/?token={admin}")
        page.wait_for_selector('#connection[data-state="live"]', timeout=WAIT_MS)


def test_pages_use_no_network_beyond_their_own_server(server: str, browser: Any) -> None:
    """No CDN: every request a page makes goes to the server that served it."""
    context = browser.new_context()
    page = context.new_page()
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(httpx.URL(request.url).host))
    page.goto(f"{server}/runs/{uuid.uuid4()}")
    page.wait_for_selector('#notice[data-kind="waiting"]', timeout=WAIT_MS)
    page.goto(f"{server}/")
    page.wait_for_selector('#connection[data-state="live"]', timeout=WAIT_MS)
    context.close()
    assert hosts == {"127.0.0.1"}


def test_demo_prints_its_web_page_and_keep_serving_keeps_it_up(prefect_api: str, page: Any) -> None:
    """``prefect-ws demo --keep-serving``: the printed URL opens the finished run in the browser."""
    import re
    import signal
    import subprocess
    import sys

    command = [str(Path(sys.executable).parent / "prefect-ws"), "demo", "--keep-serving"]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    demo = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert demo.stdout is not None
        output = []
        url = None
        for raw in demo.stdout:  # bounded by the pytest timeout
            output.append(raw.decode())
            if match := re.search(
                r"Web page: (http://127\.0\.0\.1:\d+/runs/[0-9a-f-]{36})", output[-1]
            ):
                url = match.group(1)
            if "Serving until Ctrl+C" in output[-1]:
                break
        assert url, "".join(output)
        page.goto(url)
        page.wait_for_selector('#run-status[data-status="completed"]', timeout=WAIT_MS)
        assert {s for s, (status, _, _) in _steps(page).items() if status == "completed"} == {
            "extract",
            "transform_sum",
            "transform_max",
            "load",
        }
        assert len(_visible_logs(page)) >= 8
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(20)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait(10)


def test_minimal_browser_snippet_from_another_origin(prefect_api: str, page: Any) -> None:
    """examples/browser.html served from its own origin, allowed by PREFECT_WS_ALLOWED_ORIGINS."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(EXAMPLES))
    static = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=static.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{static.server_address[1]}"
    settings = Settings(broadcast_url="memory://", log_level="WARNING", allowed_origins=[origin])
    try:
        with serve_in_thread(settings) as base_url:
            workflow = BackgroundWorkflow(EXAMPLES / "failing.yaml")
            page.goto(f"{origin}/browser.html?server={base_url}&run={workflow.run_id}")
            workflow.finish()
            page.wait_for_function(
                "document.getElementById('out').textContent.includes('run failed')",
                timeout=WAIT_MS,
            )
            lines = page.inner_text("#out").splitlines()
            assert lines[0] == "run_start failing-etl"
            assert "INFO [validate] checked 20 rows against max_value=50" in lines
            assert "step_complete validate failed" in lines
            assert "step_complete report skipped" in lines
            assert lines[-1] == "run failed"
            assert len(lines) == len(set(lines))  # nothing shown twice
    finally:
        static.shutdown()
        static.server_close()


def test_a_long_run_replays_quickly_and_completely(server: str, page: Any) -> None:
    """5,000 log lines replayed into the page: all of them, in order, in bounded time."""
    import time

    from prefect_ws.backends.memory import MemoryBackend
    from prefect_ws.protocol.events import encode

    run_id, lines = str(uuid.uuid4()), 5000

    async def publish() -> None:
        backend = MemoryBackend("memory://")
        await backend.connect()
        drafts = [
            encode(
                run_id, "run_start", {"flowName": "long", "flowRunName": "l", "layers": [["a"]]}
            ),
            encode(run_id, "step_start", {"stepId": "a", "layer": 0, "attempt": 1}),
            *(
                encode(run_id, "step_log", {"stepId": "a", "level": "INFO", "message": f"line {i}"})
                for i in range(lines)
            ),
            encode(run_id, "step_complete", {"stepId": "a", "status": "completed", "duration": 1}),
            encode(run_id, "run_complete", {"status": "completed", "duration": 2.0}),
        ]
        for start in range(0, len(drafts), 500):
            await backend.publish(run_id, drafts[start : start + 500])
        await backend.disconnect()

    publisher = threading.Thread(target=lambda: asyncio.run(publish()))
    publisher.start()
    publisher.join(30)
    started = time.monotonic()
    page.goto(f"{server}/runs/{run_id}")
    page.wait_for_selector('#run-status[data-status="completed"]', timeout=WAIT_MS)
    elapsed = time.monotonic() - started
    assert page.inner_text("#log-count") == f"{lines} lines"
    messages = page.evaluate(
        "() => [...document.querySelectorAll('.log-message')].map(m => m.textContent)"
    )
    assert messages == [f"line {i}" for i in range(lines)]
    assert elapsed < 20, f"replaying {lines} lines took {elapsed:.1f} s"


def test_runs_list_over_redis_is_newest_first_with_status_and_capped(
    redis_url: str, redis_prefix: str
) -> None:
    """The index's JSON over redis://: the publish script keeps a capped recent-runs set."""
    import redis as redis_sync

    from prefect_ws.backends.redis import RedisBackend
    from prefect_ws.protocol.events import encode

    settings = Settings(broadcast_url=redis_url, redis_prefix=redis_prefix, log_level="WARNING")
    finished, running = str(uuid.uuid4()), str(uuid.uuid4())
    filler = [str(uuid.uuid4()) for _ in range(1005)]

    async def publish() -> None:
        backend = RedisBackend(redis_url, prefix=redis_prefix)
        for run in filler:  # older runs, beyond the cap of 1000
            await backend.publish(run, [encode(run, "step_log", {"message": "x"})])
        await backend.publish(
            finished,
            [
                encode(finished, "run_start", {"flowName": "done-flow", "flowRunName": "a"}),
                encode(finished, "run_complete", {"status": "failed", "duration": 1.5}),
            ],
        )
        await backend.publish(
            running,
            [
                encode(running, "run_start", {"flowName": "live-flow", "flowRunName": "b"}),
                encode(running, "step_start", {"stepId": "s", "layer": 0, "attempt": 1}),
            ],
        )
        await backend.disconnect()

    publisher = threading.Thread(target=lambda: asyncio.run(publish()))  # Playwright owns
    publisher.start()  # this thread's event loop while the module's browser is open
    publisher.join(60)
    with serve_in_thread(settings) as base_url:
        answer = httpx.get(f"{base_url.replace('ws://', 'http://')}/api/v2/workflows/runs?limit=2")
    assert answer.status_code == 200
    body = answer.json()
    assert [r["runId"] for r in body["runs"]] == [running, finished]
    live, done = body["runs"]
    assert (live["flowName"], live["status"], live["seq"], live["duration"]) == (
        "live-flow",
        "running",
        2,
        None,
    )
    assert (done["flowName"], done["status"], done["seq"], done["duration"]) == (
        "done-flow",
        "failed",
        2,
        1.5,
    )
    assert body["active"] == 1
    client = redis_sync.Redis.from_url(redis_url)
    try:
        assert client.zcard(f"{redis_prefix}:recent-runs") == 1000
        assert client.ttl(f"{redis_prefix}:recent-runs") > 0
    finally:
        client.delete(*client.keys(f"{redis_prefix}*"))
        client.close()


def test_run_page_waits_for_a_scheduled_run_and_links_its_subflows(server: str, page: Any) -> None:
    from helpers import create_flow_run, parent_run
    from reconcile_flows import plain_sleeper
    from test_reconcile import set_prefect_state

    from prefect_ws.backends import MemoryBackend

    run_id = create_flow_run(plain_sleeper)
    set_prefect_state(run_id, "SCHEDULED")
    child = str(uuid.uuid4())
    page.goto(f"{server}/runs/{run_id}")
    page.wait_for_selector('#notice[data-kind="waiting"]', timeout=WAIT_MS)
    assert "Waiting for the run to start (Prefect state: Scheduled)" in page.inner_text("#notice")
    assert page.get_attribute("#connection", "data-state") == "waiting"

    async def publish() -> None:
        backend = MemoryBackend("memory://")
        await backend.connect()
        await backend.publish(run_id, parent_run(run_id, child))
        await backend.disconnect()

    # Playwright's sync API runs an event loop in this thread: publish from another one.
    publisher = threading.Thread(target=lambda: asyncio.run(publish()))
    publisher.start()
    publisher.join(30)
    page.wait_for_selector('#run-status[data-status="completed"]', timeout=WAIT_MS)
    link = page.locator("a.subflow-link")
    assert link.count() == 1
    assert link.get_attribute("href").endswith(f"/runs/{child}")
    assert child in link.inner_text()
    link.click()
    page.wait_for_url(f"**/runs/{child}", timeout=WAIT_MS)
