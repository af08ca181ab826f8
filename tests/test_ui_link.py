"""The link from Prefect's UI to the live page never holds a flow back."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import artifacts_of
from sample_flows import four_steps

from prefect_ws.publish import ui_link
from prefect_ws.settings import Settings


def test_live_page_url_from_the_public_url_or_host_and_port() -> None:
    run_id = "0b6c3e4e-1a2b-4c5d-8e9f-0a1b2c3d4e5f"
    assert ui_link.live_page_url(run_id, Settings(public_url="wss://ws.example/")) == (
        f"https://ws.example/runs/{run_id}"
    )
    assert ui_link.live_page_url(run_id, Settings(host="10.0.0.5", port=9000)) == (
        f"http://10.0.0.5:9000/runs/{run_id}"
    )


class SilentApi:
    """An HTTP address that reads requests and never answers: the slowest Prefect API."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/api"
        self.requests: list[bytes] = []
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.held.append(conn)
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                self.requests.append(conn.recv(65536))

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent_api() -> Iterator[SilentApi]:
    api = SilentApi()
    yield api
    api.close()


def test_a_silent_prefect_api_costs_the_flow_nothing(silent_api: SilentApi) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: silent_api.url}):
        started = time.perf_counter()
        thread = ui_link.start_link("0b6c3e4e-1a2b-4c5d-8e9f-0a1b2c3d4e5f")
        elapsed = time.perf_counter() - started
        assert thread is not None and thread.daemon
        assert elapsed < 0.05, f"start_link took {elapsed:.3f} s"
        deadline = time.monotonic() + 10
        while not any(b" /api/" in r for r in silent_api.requests):  # the client is waiting
            assert time.monotonic() < deadline, f"no request reached the API: {silent_api.requests}"
            time.sleep(0.01)
        started = time.perf_counter()
        thread.join(ui_link.END_OF_RUN_WAIT)  # what the end of a run waits, at most
        assert time.perf_counter() - started < ui_link.END_OF_RUN_WAIT + 0.2
        assert thread.is_alive()  # the request is unanswered: still waiting, in the background


def test_no_api_no_link() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: ""}):
        assert ui_link.start_link("0b6c3e4e-1a2b-4c5d-8e9f-0a1b2c3d4e5f") is None


def test_a_sync_flow_links_through_its_engines_own_client(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link thread reuses the running flow engine's API client: building a new one costs
    ~20 ms of CPU (its TLS context), most of what the link costs a run."""
    from prefect.client import orchestration

    made_by_link: list[object] = []
    original = orchestration.get_client

    def watched(*args: object, **kwargs: object) -> object:
        if threading.current_thread().name == "prefect-ws-ui-link":
            made_by_link.append(kwargs)
        return original(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(orchestration, "get_client", watched)
    state = four_steps(return_state=True)
    run_id = str(state.state_details.flow_run_id)
    deadline = time.monotonic() + 20
    while not (links := artifacts_of(run_id)):
        assert time.monotonic() < deadline, "no link artifact"
        time.sleep(0.1)
    assert links == [ui_link.link_artifact_markdown(ui_link.live_page_url(run_id))]
    assert made_by_link == []
