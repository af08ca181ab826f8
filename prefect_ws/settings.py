"""Configuration: every knob is a ``PREFECT_WS_*`` environment variable (or a ``.env`` entry)."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """prefect-ws settings. Defaults work on a laptop with nothing else installed."""

    model_config = SettingsConfigDict(env_prefix="PREFECT_WS_", extra="ignore")

    broadcast_url: str = Field(
        default="memory://",
        description="Transport: memory:// (one process), redis://host:port/db (distributed) or "
        "redis+cluster://host:port,host:port (a Redis Cluster, Redis 7+).",
    )
    redis_prefix: str = Field(
        default="prefect-ws",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Prefix of every Redis key and channel prefect-ws uses.",
    )

    # Serving side
    host: str = Field(default="127.0.0.1", description="Address `prefect-ws serve` binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port `prefect-ws serve` binds to.")
    workers: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Server processes `prefect-ws serve` runs on its port (`auto`: one per core).",
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL clients use to reach the server (printed in stream URLs).",
    )
    client_queue_size: int = Field(
        default=256, ge=1, le=1_000_000, description="Events buffered per client before catch-up."
    )
    max_lag_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A client making no progress for this long (behind, or stuck in one write) "
        "is closed (1013).",
    )
    max_inbound_bytes: int = Field(
        default=4096, ge=125, le=1 << 20, description="Largest frame a client may send."
    )
    ping_interval: float = Field(default=54.0, gt=0, description="Seconds between server pings.")
    ping_timeout: float = Field(default=30.0, gt=0, description="Seconds to wait for a pong.")
    replay_page_size: int = Field(
        default=500, ge=1, le=10_000, description="Events read from history per page on replay."
    )
    max_wait_seconds: float = Field(
        default=3600.0, ge=0, description="Longest a client may wait for an unknown run to start."
    )
    history_page_max: int = Field(
        default=1000, ge=1, le=100_000, description="Largest `limit` of the HTTP history endpoint."
    )
    history_scan_max: int = Field(
        default=10_000,
        ge=100,
        le=1_000_000,
        description="Most stored events one filtered history request reads; `next` resumes.",
    )

    # Reconciliation with Prefect's API (PREFECT_API_URL): docs/deployments.md
    reconcile_interval: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="Seconds between asking Prefect's API how the streamed runs stand.",
    )
    reconcile_grace: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description="Seconds a run Prefect reports finished has to end its stream by its own "
        "hooks before the server ends it from Prefect's record.",
    )
    prefect_api_timeout: float = Field(
        default=3.0, gt=0, le=60, description="Longest wait for one answer of Prefect's API."
    )

    # Storage
    history_maxlen: int = Field(
        default=110_000, ge=10, description="Events kept per run (Redis stream MAXLEN ~)."
    )
    history_ttl_seconds: int = Field(
        default=86_400, ge=1, description="How long a run's history lives after its last event."
    )
    memory_max_runs: int = Field(
        default=1000, ge=1, description="Runs whose history the memory:// backend keeps."
    )

    # Publishing side
    include_engine_logs: bool = Field(
        default=False,
        description="Also stream Prefect's engine lines ('Finished in state ...').",
    )
    publisher_buffer_size: int = Field(
        default=100_000, ge=10, description="Log events buffered while the backend is down."
    )
    publisher_batch_size: int = Field(
        default=500, ge=1, le=10_000, description="Most events the publisher sends per round trip."
    )
    flush_timeout_seconds: float = Field(
        default=5.0, ge=0, description="How long a finishing flow waits for its events to be sent."
    )

    # Production: auth, origins, limits, access log (docs/production.md)
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated static API keys (several, for rotation); each sees every run.",
    )
    token_secret: SecretStr | None = Field(
        default=None,
        description="HMAC secret that signs run-scoped tokens (`prefect-ws token RUN_ID`).",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated browser origins allowed (`*`: any). Empty: same origin only.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated host names requests may name in `Host` (`*.example.com` "
        "matches subdomains, `*` any). Empty: the bound address, localhost, the loopback "
        "addresses and the host of the public URL (400 otherwise: DNS rebinding).",
    )
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated addresses of proxies whose X-Forwarded-For is believed "
        "(`*`: any). Empty: none, every limit counts the connecting address.",
    )
    max_connections: int = Field(default=10_000, ge=1, description="Streams per process (503).")
    max_connections_per_ip: int = Field(
        default=100, ge=1, description="Streams per client address (429)."
    )
    handshake_rate: str = Field(
        default="120/minute",
        description="Handshakes per client address, a `limits` expression, e.g. `10/second` (429).",
        # Checking a rate imports `limits` (~20-50 ms of CPU), which a flow process never uses:
        # only a value someone set is checked (the default's check is a test).
        validate_default=False,
    )
    max_runs: int = Field(
        default=1000, ge=1, description="Runs streamed at once per process (503)."
    )
    handshake_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a client has to send its request headers."
    )
    limit_loopback: bool = Field(
        default=False,
        description="Apply the per-address limits to loopback clients too (local tools, tests "
        "and a same-host proxy that sends no X-Forwarded-For are exempt by default).",
    )
    access_log: bool = Field(default=True, description="One line per stream connect/disconnect.")
    log_json: bool = Field(default=False, description="Access log lines as JSON objects.")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Server log level."
    )

    @field_validator("broadcast_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme not in {"memory", "redis", "rediss", "unix", "redis+cluster", "rediss+cluster"}:
            from prefect_ws.backends.base import safe_url

            raise ValueError(
                f"unsupported broadcast URL {safe_url(value)!r}: use memory://, "
                "redis://host:port/db or redis+cluster://host:port,host:port"
            )
        if scheme.endswith("+cluster"):
            from prefect_ws.backends.cluster import ClusterUrl

            ClusterUrl.parse(value)  # a ValueError names what is wrong
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _cores(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return available_cores()
        return value

    @field_validator(
        "api_keys", "allowed_origins", "allowed_hosts", "forwarded_allow_ips", mode="before"
    )
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("handshake_rate")
    @classmethod
    def _rate(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError:
            raise ValueError(f"invalid rate {value!r}: use e.g. 10/second or 120/minute") from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
