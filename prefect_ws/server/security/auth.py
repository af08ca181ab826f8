"""Who may watch which run: API keys and run-scoped signed tokens.

Prefect OSS guards its streams with one shared secret and no per-run authorization. prefect-ws
adds tokens that name one flow run (or ``*`` for every run) and expire, so a page can be handed
a stream of one run and nothing else, for as long as it needs.

Tokens are compact JWTs (HS256) signed with ``PREFECT_WS_TOKEN_SECRET``, made and checked with
PyJWT: any JWT library can mint or read them. Static API keys (several, for rotation) give access
to every run. Every comparison is constant-time, and nothing here logs a credential.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import re
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import parse_qsl, urlencode

import jwt

from prefect_ws.protocol.events import canonical_run_id

if TYPE_CHECKING:
    from prefect_ws.settings import Settings

ADMIN_SCOPE: Final = "*"
SUBPROTOCOL: Final = "prefect-ws.v1"  # offered next to the token in Sec-WebSocket-Protocol
BEARER_PROTOCOL_PREFIX: Final = "bearer."
TOKEN_QUERY_PARAM: Final = "token"
MAX_CREDENTIAL_LENGTH: Final = 4096
ALGORITHM: Final = "HS256"
_DECODE_OPTIONS: Final[Any] = {
    "require": ["sub", "exp"],
    "verify_exp": False,
    "verify_iat": False,
    "verify_nbf": False,
}
_TTL_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_TTL_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
PRINCIPAL_SCOPE_KEY: Final = "prefect_ws.principal"


class AuthError(Exception):
    """A refused credential; ``status`` is the HTTP status (401/403), ``reason`` is safe to show."""

    def __init__(self, status: int, reason: str, metric: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.metric = metric


@dataclass(frozen=True, slots=True)
class Principal:
    """An accepted caller: what it is, which run it may watch (``*`` = all) and until when."""

    kind: str  # "anonymous" | "api_key" | "token"
    scope: str
    expires_at: float | None = None  # epoch seconds; None = does not expire

    def allows(self, run_id: str) -> bool:
        return self.scope == ADMIN_SCOPE or hmac.compare_digest(self.scope, run_id)

    @property
    def is_admin(self) -> bool:
        return self.scope == ADMIN_SCOPE


ANONYMOUS: Final = Principal(kind="anonymous", scope=ADMIN_SCOPE)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def normalize_scope(run_id: str) -> str:
    """``*`` or the canonical form of a flow run UUID; :class:`ValueError` otherwise."""
    if run_id == ADMIN_SCOPE:
        return ADMIN_SCOPE
    canonical = canonical_run_id(run_id)
    if canonical is None:
        raise ValueError(f"not a flow run UUID: {run_id[:80]!r}")
    return canonical


def parse_ttl(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1h``, ``2d``, ``1w`` -> seconds (positive)."""
    match = _TTL_RE.match(text)
    if not match:
        raise ValueError(f"invalid TTL {text!r}: use e.g. 90s, 30m, 1h, 2d")
    seconds = float(match.group(1)) * _TTL_UNITS[match.group(2).lower()]
    if seconds <= 0:
        raise ValueError("the TTL must be positive")
    return seconds


def mint_token(
    run_id: str, *, secret: str | bytes, ttl: float = 3600.0, now: float | None = None
) -> str:
    """A token that lets its bearer watch ``run_id`` (``*``: every run) for ``ttl`` seconds."""
    if not secret:
        raise ValueError("a token secret is required (PREFECT_WS_TOKEN_SECRET)")
    if ttl <= 0:
        raise ValueError("the TTL must be positive")
    issued = int(time.time() if now is None else now)
    claims = {"sub": normalize_scope(run_id), "iat": issued, "exp": issued + max(1, round(ttl))}
    return jwt.encode(claims, secret, algorithm=ALGORITHM, headers={"typ": "JWT"})


def _claims(token: str, secret: str | bytes) -> dict[str, Any] | None:
    """The token's claims if ``secret`` signed it, None if another did; AuthError otherwise."""
    try:
        # Expiry is checked by the caller, against its own clock (``now``).
        return dict(jwt.decode(token, secret, algorithms=[ALGORITHM], options=_DECODE_OPTIONS))
    except jwt.InvalidSignatureError:
        return None
    except jwt.InvalidAlgorithmError:
        raise AuthError(401, "unsupported token algorithm", "token_malformed") from None
    except jwt.DecodeError:
        raise AuthError(401, "malformed token", "token_malformed") from None
    except jwt.InvalidTokenError:
        raise AuthError(401, "malformed token claims", "token_malformed") from None


def verify_token(
    token: str, *, secrets: Iterable[str | bytes], now: float | None = None
) -> Principal:
    """The principal a token grants, or :class:`AuthError` (401) saying what is wrong with it.

    The signature is checked against every configured secret before anything in the token is
    believed; only ``alg: HS256`` is accepted, so ``alg: none`` tricks fail.
    """
    found: dict[str, Any] | None = None
    for secret in secrets:
        # No early exit: the time taken does not depend on which secret matched.
        claims = _claims(token, secret)
        found = found if claims is None else claims
    if found is None:
        raise AuthError(401, "invalid token signature", "token_signature")
    try:
        scope = normalize_scope(str(found["sub"]))
        expires_at = float(found["exp"])
    except (ValueError, KeyError, TypeError):
        raise AuthError(401, "malformed token claims", "token_malformed") from None
    if expires_at <= (time.time() if now is None else now):
        raise AuthError(401, "token expired", "token_expired")
    return Principal(kind="token", scope=scope, expires_at=expires_at)


class Authenticator:
    """Turns the credentials of a request into a :class:`Principal`, or refuses them."""

    def __init__(self, api_keys: Iterable[str] = (), token_secrets: Iterable[str] = ()) -> None:
        # Keys are compared as SHA-256 digests: equal lengths, so the time taken says nothing.
        self._api_keys = [_digest(key) for key in api_keys if key]
        self._secrets = [secret for secret in token_secrets if secret]

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        secret = settings.token_secret.get_secret_value() if settings.token_secret else ""
        return cls(settings.api_keys, [secret])

    @property
    def enabled(self) -> bool:
        """False: auth mode "none", every caller is an anonymous admin."""
        return bool(self._api_keys or self._secrets)

    def authenticate(self, credential: str | None, now: float | None = None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not credential:
            raise AuthError(401, "missing credentials", "auth_missing")
        if len(credential) > MAX_CREDENTIAL_LENGTH:
            raise AuthError(401, "malformed credentials", "token_malformed")
        candidate = _digest(credential)
        matched = False
        for key in self._api_keys:
            matched |= hmac.compare_digest(candidate, key)
        if matched:
            return Principal(kind="api_key", scope=ADMIN_SCOPE)
        if not self._secrets:
            raise AuthError(401, "invalid API key", "api_key_invalid")
        if credential.count(".") != 2:
            raise AuthError(401, "invalid API key or malformed token", "token_malformed")
        return verify_token(credential, secrets=self._secrets, now=now)


def extract_credential(
    headers: Mapping[str, str], query: list[tuple[str, str]], subprotocols: list[str]
) -> str | None:
    """The credential of a request: ``Authorization: Bearer``, ``?token=`` or a subprotocol.

    Browsers cannot set headers on a WebSocket, hence the query parameter and the
    ``Sec-WebSocket-Protocol: prefect-ws.v1, bearer.<token>`` form.
    """
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return ""  # present but not a bearer credential: refused as malformed
    for name, value in query:
        if name == TOKEN_QUERY_PARAM:
            return value
    for protocol in subprotocols:
        if protocol.startswith(BEARER_PROTOCOL_PREFIX):
            return protocol[len(BEARER_PROTOCOL_PREFIX) :]
    return None


def strip_credentials(query_string: bytes) -> bytes:
    """The query string without ``token=`` in any spelling (``%74oken=``, ``TOKEN=``), so that no
    later log line can show it."""
    if not query_string:
        return query_string
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if k.strip().lower() != TOKEN_QUERY_PARAM]
    if len(kept) == len(pairs) and b"%" not in query_string and b"+" not in query_string:
        return query_string  # nothing to take out: the bytes as they came
    return urlencode(kept).encode("latin-1")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class UnsafeBind(Exception):
    """Serving every run to anybody on the network needs an explicit ``--insecure``."""


def check_bind(host: str, *, auth_enabled: bool, insecure: bool) -> None:
    """Refuse to serve a non-loopback address without auth, unless told ``--insecure``."""
    if auth_enabled or insecure or is_loopback(host):
        return
    raise UnsafeBind(
        f"refusing to serve {host} without authentication: set PREFECT_WS_API_KEYS or "
        "PREFECT_WS_TOKEN_SECRET, or pass --insecure to serve every run to anyone who can connect"
    )


class _Abortable(Protocol):
    def abort(self, code: int, reason: str) -> None: ...


def principal_of(scope: Mapping[str, Any]) -> Principal | None:
    """The principal the credentials check accepted (None when no check ran)."""
    principal = scope.get(PRINCIPAL_SCOPE_KEY)
    return principal if isinstance(principal, Principal) else None


def schedule_expiry(
    scope: Mapping[str, Any], subscription: _Abortable
) -> asyncio.TimerHandle | None:
    """End the stream when its token expires (close code 4401), so the client gets a new one.

    Holds the subscription weakly: a stream that ended earlier is not kept alive by its timer.
    Cancel the returned handle when the stream ends.
    """
    from prefect_ws.protocol import closecodes

    principal = principal_of(scope)
    if principal is None or principal.expires_at is None:
        return None
    ref = weakref.ref(subscription)

    def expire() -> None:
        target = ref()
        if target is not None:
            target.abort(closecodes.TOKEN_EXPIRED, "token expired")

    loop = asyncio.get_running_loop()
    delay = max(0.0, principal.expires_at - time.time())
    return loop.call_later(delay, expire)
