"""``prefect-ws tail``'s argument parsers: typer calls them before anything connects.

Each is an option's ``parser=``: a ``ValueError`` becomes "Invalid value for '--url': ..." and
exit code 2. Kept apart from the live view so the command line imports only this.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit, urlunsplit

from prefect_ws.protocol.events import EVENT_TYPES, canonical_run_id

LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_SINCE: Final = 2**53
MAX_WAIT: Final = 86_400


class UsageError(ValueError):
    """A command-line value that cannot work; the message says which and why."""


def parse_base_url(raw: str) -> str:
    """``ws://``/``wss://`` (or ``http://``/``https://``, mapped) host and optional path prefix."""
    text = raw.strip()
    try:
        parts = urlsplit(text)
        port = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise UsageError(f"{raw!r}: {exc}") from None
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in ("ws", "wss"):
        raise UsageError(f"{raw!r}: expected ws://host:port or wss://host")
    if not parts.hostname:
        raise UsageError(f"{raw!r}: no host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise UsageError(f"{raw!r}: no query, fragment or credentials (use --token)")
    if any(ch.isspace() or ord(ch) < 32 for ch in text):
        raise UsageError(f"{raw!r}: contains whitespace or control characters")
    del port
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def parse_run_id(raw: str) -> str:
    run_id = canonical_run_id(raw)
    if run_id is None:
        raise UsageError(f"{raw[:80]!r}: expected a flow run UUID")
    return run_id


def parse_types(value: str) -> str:
    """One ``--types`` value: comma-separated known event types, returned normalised."""
    names = [item.strip() for item in value.split(",") if item.strip()]
    for name in names:
        if name not in EVENT_TYPES:
            raise UsageError(f"{name[:40]!r}: expected any of {', '.join(EVENT_TYPES)}")
    return ",".join(names)


def event_types(values: list[str]) -> tuple[str, ...]:
    """``--types a,b --types c`` (each value already parsed) -> ``(a, b, c)``, no repeats."""
    return tuple(dict.fromkeys(name for value in values for name in value.split(",") if name))


def parse_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in LEVELS:
        raise UsageError(f"{raw[:40]!r}: expected one of {', '.join(LEVELS)}")
    return level


def parse_step(step: str) -> str:
    if len(step) > 200 or any(ord(ch) < 32 for ch in step):
        raise UsageError(f"{step[:40]!r}: too long or has control characters")
    return step


def parse_token(token: str) -> str:
    if not token.strip() or any(ord(ch) < 33 for ch in token):
        raise UsageError("empty or contains whitespace/control characters")
    return token
