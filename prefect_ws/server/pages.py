"""The web pages: a run page, an index of recent runs, their static files and a runs list API.

Everything the pages show comes from the public stream and the JSON list below, so the page is
also a reference client. The HTML, JS and CSS are plain files in ``prefect_ws/server/web`` (no build
step, no CDN): the page works offline, from the pip-installed package alone.
"""

from __future__ import annotations

import asyncio
import html
import json
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from prefect_ws.backends import Transport
from prefect_ws.backends.base import RecentRun
from prefect_ws.protocol.events import canonical_run_id
from prefect_ws.server.streams import ascii_integer

WEB_DIR: Final = Path(__file__).resolve().parent / "web"
RUNS_PATH: Final = "/api/v2/workflows/runs"
DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 200

# Pages load only their own files and talk only to their own origin.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@lru_cache(maxsize=4)
def _template(name: str) -> str:
    return (WEB_DIR / name).read_text(encoding="utf-8")


def _page(name: str, config: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    # JSON inside <script type="application/json">: "<" escaped so no value can close the tag.
    data = json.dumps(config, ensure_ascii=True).replace("<", "\\u003c").replace(">", "\\u003e")
    body = _template(name).replace("__PREFECT_WS_CONFIG__", data)
    return HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)


def _error_page(status_code: int, title: str, message: str) -> HTMLResponse:
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>prefect-ws: {html.escape(title)}</title>"
        '<link rel="stylesheet" href="../static/style.css"></head>'
        f'<body><main class="error-page"><h1>{html.escape(title)}</h1>'
        f'<p id="error-message">{html.escape(message)}</p>'
        '<p><a href="../">All runs</a></p></main></body></html>'
    )
    return HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)


def prefect_ui_url() -> str | None:
    """``PREFECT_UI_URL`` (Prefect derives it from ``PREFECT_API_URL`` when unset), or None."""
    try:
        from prefect.settings import get_current_settings

        url = get_current_settings().ui_url
    except Exception:  # Prefect misconfigured: the page still works, without the link
        return None
    if not url or not str(url).lower().startswith(("http://", "https://")):
        return None
    return str(url).rstrip("/")


def _base_path(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


async def run_page(request: Request) -> Response:
    raw = request.path_params["run_id"]
    run_id = canonical_run_id(raw)
    if run_id is None:
        shown = raw if len(raw) <= 80 else raw[:80] + "…"
        return _error_page(
            400, "Invalid run id", f"{shown!r} is not a flow run id: expected a UUID."
        )
    ui = prefect_ui_url()
    return _page(
        "run.html",
        {
            "runId": run_id,
            "base": _base_path(request),
            "prefectRunUrl": f"{ui}/runs/flow-run/{run_id}" if ui else None,
        },
    )


async def index_page(request: Request) -> Response:
    return _page("index.html", {"base": _base_path(request), "prefectUiUrl": prefect_ui_url()})


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _summary(transport: Transport, run: RecentRun) -> dict[str, Any]:
    """A run's row: its ``run_start`` and its newest event say what it is and where it stands."""
    backend = transport.backend
    first, last = await asyncio.gather(
        backend.history(run.run_id, 0, 1), backend.history(run.run_id, max(0, run.head_seq - 1), 1)
    )
    start = json.loads(first[0]) if first else {}
    end = json.loads(last[0]) if last else {}
    started = start.get("payload", {}) if start.get("type") == "run_start" else {}
    finished = end.get("payload", {}) if end.get("type") == "run_complete" else None
    return {
        "runId": run.run_id,
        "flowName": started.get("flowName"),
        "flowRunName": started.get("flowRunName"),
        "status": finished.get("status") if finished else "running",
        "startedAt": start.get("ts") if started else None,
        "updatedAt": _iso(run.updated),
        "duration": finished.get("duration") if finished else None,
        "seq": run.head_seq,
        "page": f"/runs/{run.run_id}",
    }


async def list_runs(request: Request) -> JSONResponse:
    """``GET /api/v2/workflows/runs?limit=N``: the most recently active runs, newest first."""
    raw = request.query_params.get("limit", "")
    if raw == "":
        limit = DEFAULT_LIMIT
    elif (value := ascii_integer(raw)) is not None and 1 <= value <= MAX_LIMIT:
        limit = value
    else:
        return JSONResponse(
            {"error": f"invalid limit: expected an integer from 1 to {MAX_LIMIT}"}, status_code=400
        )
    transport: Transport = request.app.state.transport
    try:
        runs = await transport.backend.recent_runs(limit)
        rows = await asyncio.gather(*(_summary(transport, run) for run in runs))
    except Exception as exc:
        return JSONResponse(
            {"error": f"backend unavailable: {type(exc).__name__}"}, status_code=503
        )
    return JSONResponse(
        {"runs": list(rows), "active": sum(1 for r in rows if r["status"] == "running")},
        headers={"Cache-Control": "no-store"},
    )


def page_routes() -> list[BaseRoute]:
    """Routes for :func:`prefect_ws.server.app.create_app`."""
    return [
        Route("/", index_page, methods=["GET"]),
        Route("/runs/{run_id:path}", run_page, methods=["GET"]),
        Route(RUNS_PATH, list_runs, methods=["GET"]),
        Mount("/static", StaticFiles(directory=WEB_DIR), name="static"),
    ]
