"""The ``prefect-ws`` command."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from prefect_ws.clients import tail_args
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
    forwarded_allow_ips: str = typer.Option(
        None,
        help="Comma-separated proxy addresses whose X-Forwarded-For is believed "
        "[default: PREFECT_WS_FORWARDED_ALLOW_IPS or none].",
    ),
    workers: str = typer.Option(
        None,
        help="Server processes on the port, or 'auto' for one per core; more than one needs "
        "redis:// or redis+cluster:// [default: PREFECT_WS_WORKERS or 1].",
    ),
) -> None:
    """Serve the WebSocket hub (uvicorn)."""
    import uvicorn

    from prefect_ws.server.gctuning import tune_for_serving
    from prefect_ws.server.security.auth import Authenticator, UnsafeBind, check_bind
    from prefect_ws.server.uvicorn.config import uvicorn_config

    settings = _settings(
        host=host,
        port=port,
        broadcast_url=broadcast_url,
        forwarded_allow_ips=forwarded_allow_ips,
        workers=workers,
    )
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
    if settings.host in ("0.0.0.0", "::") and not (settings.allowed_hosts or settings.public_url):
        typer.secho(
            f"prefect-ws: requests must name this server in Host; serving {settings.host}, set "
            "PREFECT_WS_ALLOWED_HOSTS or PREFECT_WS_PUBLIC_URL to the names clients use "
            "(otherwise only localhost and loopback addresses are answered)",
            err=True,
            fg="yellow",
        )
    tls = {"ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile} if ssl_certfile else {}
    _check_backend(settings)
    if settings.workers > 1:
        _serve_workers(settings, tls)
        return
    tune_for_serving()
    uvicorn.Server(uvicorn_config(settings, host=settings.host, port=settings.port, **tls)).run()


def _check_backend(settings: Settings) -> None:
    """Refuse what cannot work before serving: memory:// across processes, a cluster with
    nodes that do not answer (named)."""
    from prefect_ws.backends.cluster import ClusterUnreachable, check_cluster, is_cluster_url

    url = settings.broadcast_url
    if settings.workers > 1 and url.lower().startswith("memory://"):
        typer.secho(
            f"prefect-ws: --workers {settings.workers} needs a backend the processes share: "
            "memory:// keeps each run inside one process. Use redis://host:port/db or "
            "redis+cluster://host:port,... (PREFECT_WS_BROADCAST_URL), or one worker.",
            err=True,
            fg="red",
        )
        raise typer.Exit(2)
    if is_cluster_url(url):
        try:
            asyncio.run(check_cluster(url))
        except ClusterUnreachable as exc:
            typer.secho(f"prefect-ws: {exc}", err=True, fg="red")
            raise typer.Exit(2) from None


def _serve_workers(settings: Settings, tls: dict[str, Any]) -> None:
    """N processes on one port under uvicorn's supervisor (restarts a dead worker; SIGHUP
    replaces them one by one; SIGTERM stops them, each closing its clients with 1012)."""
    from prefect_ws.server.uvicorn.config import serve_workers

    # Workers read their settings from the environment: put the command line's there.
    os.environ["PREFECT_WS_HOST"] = settings.host
    os.environ["PREFECT_WS_PORT"] = str(settings.port)
    os.environ["PREFECT_WS_BROADCAST_URL"] = settings.broadcast_url
    os.environ["PREFECT_WS_FORWARDED_ALLOW_IPS"] = ",".join(settings.forwarded_allow_ips)
    serve_workers(settings, host=settings.host, port=settings.port, workers=settings.workers, **tls)


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
    run_id: str = typer.Argument(
        ..., metavar="RUN_ID", help="The flow run id (UUID).", parser=tail_args.parse_run_id
    ),
    url: str = typer.Option(
        "ws://127.0.0.1:8000",
        envvar="PREFECT_WS_URL",
        help="Server base URL (ws:// or wss://).",
        parser=tail_args.parse_base_url,
    ),
    since: int = typer.Option(0, min=0, max=tail_args.MAX_SINCE, help="Start after this seq."),
    types: list[str] = typer.Option(  # noqa: B008
        [],
        "--types",
        help="Only these event types (comma-separated or repeated).",
        parser=tail_args.parse_types,
    ),
    step: list[str] = typer.Option(  # noqa: B008
        [], "--step", help="Only these steps (repeatable).", parser=tail_args.parse_step
    ),
    level: str = typer.Option(
        None,
        help="Minimum log level: DEBUG, INFO, WARNING, ERROR.",
        parser=tail_args.parse_level,
    ),
    token: str = typer.Option(
        None,
        envvar="PREFECT_WS_TOKEN",
        help="Access token, if required.",
        parser=tail_args.parse_token,
    ),
    json_lines: bool = typer.Option(False, "--json", help="One event per line, as received."),
    wait: float = typer.Option(
        None,
        min=0,
        max=tail_args.MAX_WAIT,
        help="Wait up to this many seconds for a run that has not started yet.",
    ),
) -> None:
    """Follow a run live; exit 0 if it completed, 1 if it failed, 3 if the stream was refused.

    Every argument is checked by typer before anything connects: bad input exits 2.
    """
    from prefect_ws.clients.tail import TailOptions
    from prefect_ws.clients.tail import tail as run_tail

    options = TailOptions(
        base_url=url,
        run_id=run_id,
        since=since,
        types=tail_args.event_types(types),
        steps=tuple(s for s in step if s),
        level=level,
        token=token or None,
        json=json_lines,
        wait=wait,
    )
    raise typer.Exit(run_tail(options))


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
