"""Reconciliation rounds against a scripted Prefect API: what Prefect answers is replayed as
given (duplicates, runs nobody asked about, a stale state after a final one, a run that keeps
publishing after Prefect recorded its end), through Prefect's real client and real HTTP.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from delivery_support import complete_draft, log_draft, new_run_id

from prefect_ws.backends import MemoryBackend
from prefect_ws.server.prefect_api import PrefectRuns
from prefect_ws.server.reconcile import Reconciler


class ScriptedPrefect(http.server.ThreadingHTTPServer):
    """``POST /api/flow_runs/filter`` answers ``self.runs`` as they are (a list of flow runs)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.runs: list[dict[str, Any]] = []
        self.calls = 0
        self.read_status = 404  # GET /api/flow_runs/<id>: how Prefect answers a single run

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ScriptedPrefect

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.startswith("/api/health"):
            self._answer(200, True)
        elif self.path.startswith("/api/flow_runs/"):
            self._answer(self.server.read_status, {"detail": "scripted"})
        else:  # /csrf-token: an API without CSRF protection
            self._answer(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.calls += 1
        self._answer(200, self.server.runs)

    def log_message(self, *args: Any) -> None:
        pass


def flow_run(run_id: str, state: str, name: str | None = None) -> dict[str, Any]:
    return {
        "id": run_id,
        "flow_id": str(uuid.uuid4()),
        "name": "scripted",
        "state": {"type": state, "name": name or state.title(), "message": f"{state} by script"},
    }


@pytest.fixture
def prefect() -> Iterator[ScriptedPrefect]:
    server = ScriptedPrefect()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


async def _reconciler(
    prefect: ScriptedPrefect, watched: set[str], grace: float
) -> tuple[Reconciler, MemoryBackend]:
    from prefect.client.orchestration import PrefectClient

    backend = MemoryBackend(f"memory://rounds-{uuid.uuid4()}")
    await backend.connect()
    reconciler = Reconciler(backend, lambda: watched, interval=3600, grace=grace, timeout=3.0)
    client = PrefectClient(api=prefect.url)
    await client.__aenter__()
    reconciler.prefect = PrefectRuns(prefect.url, client, 3.0)
    return reconciler, backend


async def _types(backend: MemoryBackend, run_id: str) -> list[str]:
    return [json.loads(t)["type"] for t in await backend.history(run_id, 0, 1000)]


def test_duplicates_strangers_and_stale_states_publish_nothing_wrong(
    prefect: ScriptedPrefect,
) -> None:
    watched_run, stranger = new_run_id(), new_run_id()

    async def main() -> None:
        reconciler, backend = await _reconciler(prefect, {watched_run}, grace=0)
        await backend.publish(watched_run, [log_draft(watched_run, 0)])
        # Twice the same final state, and a run this process never asked about.
        prefect.runs = [
            flow_run(watched_run, "CRASHED"),
            flow_run(watched_run, "CRASHED"),
            flow_run(stranger, "FAILED"),
        ]
        await reconciler.check()
        # A stale answer (an older state) after the final one, then the final one again.
        prefect.runs = [flow_run(watched_run, "RUNNING")]
        await reconciler.check()
        prefect.runs = [flow_run(watched_run, "COMPLETED")]
        await reconciler.check()
        assert await _types(backend, watched_run) == ["step_log", "run_complete"]
        assert await _types(backend, stranger) == []
        end = json.loads((await backend.history(watched_run, 1, 1))[0])["payload"]
        assert (end["status"], end["error"], end["reconciled"]) == (
            "crashed",
            "CRASHED by script",
            True,
        )
        assert reconciler.reconciled == 1
        calls = prefect.calls
        await reconciler.check()  # ended: not asked about again
        assert prefect.calls == calls
        await reconciler.close()

    asyncio.run(main())


def test_a_run_still_publishing_after_prefect_recorded_its_end_is_left_to_its_hooks(
    prefect: ScriptedPrefect,
) -> None:
    run_id = new_run_id()

    async def main() -> None:
        reconciler, backend = await _reconciler(prefect, {run_id}, grace=0.3)
        prefect.runs = [flow_run(run_id, "COMPLETED")]
        for n in range(5):  # a publisher sending its backlog while the server checks
            await backend.publish(run_id, [log_draft(run_id, n)])
            await reconciler.check()
            await asyncio.sleep(0.4)  # longer than the grace: only the moving head holds it
        await backend.publish(run_id, [complete_draft(run_id)])  # its hooks end it
        await reconciler.check()
        assert await _types(backend, run_id) == ["step_log"] * 5 + ["run_complete"]
        assert reconciler.reconciled == 0

        # Once quiet for the grace, a run that did not end is ended by the server.
        silent = new_run_id()
        await backend.publish(silent, [log_draft(silent, 0)])
        prefect.runs = [flow_run(silent, "COMPLETED")]
        reconciler._watched = lambda: {silent}
        await reconciler.check()
        assert await _types(backend, silent) == ["step_log"]  # just seen final
        await asyncio.sleep(0.35)
        await reconciler.check()
        assert await _types(backend, silent) == ["step_log", "run_complete"]
        await reconciler.close()

    asyncio.run(main())


@pytest.mark.parametrize(("status", "reachable"), [(404, True), (422, True), (500, False)])
def test_a_run_prefect_does_not_know_or_rejects_is_unknown(
    prefect: ScriptedPrefect, status: int, reachable: bool
) -> None:
    """404 (no such run) and 422 (an id Prefect rejects) are an unknown run: the stream is a
    4404; an error of Prefect's own (500) is an unavailable API, said in /healthz."""
    prefect.read_status = status

    async def main() -> None:
        reconciler, _ = await _reconciler(prefect, set(), grace=0)
        assert await reconciler.lookup(new_run_id()) is None
        assert reconciler.reachable is reachable
        await reconciler.close()

    asyncio.run(main())
