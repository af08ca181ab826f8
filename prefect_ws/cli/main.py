"""The ``prefect-ws`` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from prefect_ws.settings import Settings

app = typer.Typer(
    name="prefect-ws",
    help="Stream Prefect flow runs live to WebSocket clients.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _settings(**overrides: Any) -> Settings:
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
    port: int = typer.Option(
        None, min=0, max=65535, help="Port [default: PREFECT_WS_PORT or 8000]."
    ),
    broadcast_url: str = typer.Option(
        None, help="memory:// or redis://host:port/db [default: PREFECT_WS_BROADCAST_URL]."
    ),
    ssl_certfile: str = typer.Option(
        None, help="TLS certificate (PEM): serve wss:// and https://."
    ),
    ssl_keyfile: str = typer.Option(None, help="TLS private key (PEM) for --ssl-certfile."),
    insecure: bool = typer.Option(
        False, "--insecure", help="Allow a non-loopback address without authentication."
    ),
) -> None:
    """Serve the WebSocket hub (uvicorn)."""
    import uvicorn

    from prefect_ws.server.gctuning import tune_for_serving
    from prefect_ws.server.security.auth import Authenticator, UnsafeBind, check_bind
    from prefect_ws.server.uvicorn.config import uvicorn_config

    settings = _settings(host=host, port=port, broadcast_url=broadcast_url)
    try:
        check_bind(
            settings.host,
            auth_enabled=Authenticator.from_settings(settings).enabled,
            insecure=insecure,
        )
    except UnsafeBind as exc:
        typer.secho(f"prefect-ws: {exc}", err=True, fg="red")
        raise typer.Exit(2) from None
    if bool(ssl_certfile) != bool(ssl_keyfile):
        typer.secho("prefect-ws: --ssl-certfile and --ssl-keyfile go together", err=True, fg="red")
        raise typer.Exit(2)
    tls = {"ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile} if ssl_certfile else {}
    tune_for_serving()
    uvicorn.Server(uvicorn_config(settings, host=settings.host, port=settings.port, **tls)).run()


@app.command()
def token(
    run_id: str = typer.Argument(..., help="Flow run id (UUID) the token is for; '*': all runs."),
    ttl: str = typer.Option("1h", help="Lifetime: 90s, 30m, 1h, 2d."),
) -> None:
    """Print a run-scoped access token signed with PREFECT_WS_TOKEN_SECRET."""
    from prefect_ws.server.security.auth import mint_token, parse_ttl

    settings = _settings()
    if settings.token_secret is None:
        typer.secho("prefect-ws: set PREFECT_WS_TOKEN_SECRET to mint tokens", err=True, fg="red")
        raise typer.Exit(2)
    try:
        typer.echo(
            mint_token(run_id, secret=settings.token_secret.get_secret_value(), ttl=parse_ttl(ttl))
        )
    except ValueError as exc:
        typer.secho(f"prefect-ws token: {exc}", err=True, fg="red")
        raise typer.Exit(2) from None


@app.command()
def demo(
    keep_serving: bool = typer.Option(False, help="Keep the server up after the run."),
) -> None:
    """Run a demo flow and watch it stream live in this terminal (memory://, no setup)."""
    from prefect_ws.cli.demo import run_demo

    raise typer.Exit(run_demo(keep_serving=keep_serving))


@app.command()
def run(
    workflow_file: Path = typer.Argument(..., help="A workflow definition (.yaml, .yml or .json)."),  # noqa: B008
    param: list[str] = typer.Option(  # noqa: B008
        [], "--param", "-p", help="Override a workflow parameter: key=value (repeatable)."
    ),
    url: str = typer.Option(
        None,
        envvar="PREFECT_WS_URL",
        help="Base URL of the prefect-ws server clients use (printed in the stream URL). "
        "Default: PREFECT_WS_PUBLIC_URL, or with memory:// a server in this process.",
    ),
    watch: bool = typer.Option(False, "--watch", help="Print the run's stream here as it happens."),
) -> None:
    """Validate and run a workflow; exit 0 if it completed, 1 if it failed, 2 if it is invalid."""
    from prefect_ws.workflow.command import run_command

    raise typer.Exit(run_command(workflow_file, param, url, watch, _settings()))


@app.command()
def tail(
    run_id: str = typer.Argument(..., help="The flow run id (UUID)."),
    url: str = typer.Option(
        "ws://127.0.0.1:8000", envvar="PREFECT_WS_URL", help="Server base URL (ws:// or wss://)."
    ),
    since: int = typer.Option(0, help="Start after this seq (resume)."),
    types: list[str] = typer.Option(  # noqa: B008
        [], "--types", help="Only these event types (comma-separated or repeated)."
    ),
    step: list[str] = typer.Option([], "--step", help="Only these steps (repeatable)."),  # noqa: B008
    level: str = typer.Option(None, help="Minimum log level: DEBUG, INFO, WARNING, ERROR."),
    token: str = typer.Option(None, envvar="PREFECT_WS_TOKEN", help="Access token, if required."),
    json_lines: bool = typer.Option(False, "--json", help="One event per line, as received."),
    wait: float = typer.Option(
        None, help="Wait up to this many seconds for a run that has not started yet."
    ),
) -> None:
    """Follow a run live; exit 0 if it completed, 1 if it failed, 3 if the stream was refused."""
    from prefect_ws.clients.tail import EXIT_USAGE, UsageError, make_options
    from prefect_ws.clients.tail import tail as run_tail

    try:
        options = make_options(
            run_id,
            url=url,
            since=since,
            types=types,
            steps=step,
            level=level,
            token=token,
            json=json_lines,
            wait=wait,
        )
    except UsageError as exc:
        typer.secho(f"prefect-ws tail: {exc}", err=True, fg="red")
        raise typer.Exit(EXIT_USAGE) from None
    raise typer.Exit(run_tail(options))


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
