"""The ``prefect-ws`` command."""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError

app = typer.Typer(
    name="prefect-ws",
    help="Stream Prefect flow runs live to WebSocket clients.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _settings(**overrides: object):  # type: ignore[no-untyped-def]
    from prefect_ws.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "settings"
            typer.secho(
                f"prefect-ws: invalid setting PREFECT_WS_{field.upper()}: {error['msg']}",
                err=True,
                fg="red",
            )
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: str = typer.Option(None, help="Address to bind [default: PREFECT_WS_HOST or 127.0.0.1]."),
    port: int = typer.Option(None, min=0, max=65535, help="Port [default: PREFECT_WS_PORT or 8000]."),
    broadcast_url: str = typer.Option(
        None, help="memory:// or redis://host:port/db [default: PREFECT_WS_BROADCAST_URL]."
    ),
) -> None:
    """Serve the WebSocket hub (uvicorn)."""
    import uvicorn

    from prefect_ws.server import uvicorn_config

    settings = _settings(host=host, port=port, broadcast_url=broadcast_url)
    uvicorn.Server(uvicorn_config(settings, host=settings.host, port=settings.port)).run()


@app.command()
def demo(
    keep_serving: bool = typer.Option(False, help="Keep the server up after the run."),
) -> None:
    """Run a demo flow and watch it stream live in this terminal (memory://, no setup)."""
    from prefect_ws.demo import run_demo

    raise typer.Exit(run_demo(keep_serving=keep_serving))


def main() -> None:
    sys.exit(app())
