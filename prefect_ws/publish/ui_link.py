"""A link from Prefect's UI to the live stream: one markdown artifact on each streamed flow run.

Prefect's flow run page lists the run's artifacts, so a person looking at the run there opens
the live page (``/runs/<id>`` of ``prefect-ws serve``) in one click. The address is
``PREFECT_WS_PUBLIC_URL``, else ``http://PREFECT_WS_HOST:PREFECT_WS_PORT``.

The artifact is created from a daemon thread, so a slow or unreachable Prefect API never delays
or fails the flow; the end of the run waits for it at most :data:`END_OF_RUN_WAIT` seconds (a
run shorter than one API round trip would otherwise exit before its link exists). Without a
``PREFECT_API_URL`` there is no UI to link from, and nothing is done.
"""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from typing import Any, Final
from uuid import UUID

from prefect_ws.settings import Settings, get_settings

logger = logging.getLogger("prefect_ws.ui_link")

END_OF_RUN_WAIT: Final = 0.5
ARTIFACT_DESCRIPTION: Final = "prefect-ws: this run's live event stream"


def live_page_url(run_id: str, settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    base = (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")
    for ws, http in (("ws://", "http://"), ("wss://", "https://")):
        if base.startswith(ws):
            base = http + base[len(ws) :]
    return f"{base}/runs/{run_id}"


def link_artifact_markdown(url: str) -> str:
    return f"[Open the live stream]({url})"


def start_link(run_id: str, client: Any = None) -> threading.Thread | None:
    """Create the run's link artifact in the background; the thread, or None if there is no API.

    The thread uses the caller's Prefect settings (a flow may run under temporary settings or a
    profile; a new thread would otherwise see only the process's defaults) and ``client``, the
    flow engine's own blocking API client, when given: a new client builds a TLS context even
    for an http:// API, ~20 ms of CPU, most of what the link costs a run. httpx's blocking
    client may be shared between threads.
    """
    try:
        from prefect.context import SettingsContext

        current = SettingsContext.get()
        if current is None or not current.settings.api.url:
            return None
        url = live_page_url(run_id)
    except Exception:  # settings that cannot be read: no link, the stream is unaffected
        return None
    thread = threading.Thread(
        target=_create_with,
        args=(current.profile, current.settings, run_id, url, client),
        name="prefect-ws-ui-link",
        daemon=True,
    )
    thread.start()
    return thread


def _create_with(profile: Any, settings: Any, run_id: str, url: str, client: Any) -> None:
    from prefect.context import SettingsContext

    with SettingsContext(profile=profile, settings=settings):
        _create(run_id, url, client)


def _create(run_id: str, url: str, client: Any = None) -> None:
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactCreate

        with nullcontext(client) if client is not None else get_client(sync_client=True) as api:
            api.create_artifact(
                ArtifactCreate(
                    type="markdown",
                    data=link_artifact_markdown(url),
                    description=ARTIFACT_DESCRIPTION,
                    flow_run_id=UUID(run_id),
                )
            )
    except Exception as exc:
        # the type only: an API error's text may carry the API's address and its credentials
        logger.warning(
            "prefect-ws: no link to the live stream in Prefect's UI (%s)", type(exc).__name__
        )
