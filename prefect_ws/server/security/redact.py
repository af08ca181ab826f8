"""Credential-shaped text out of anything written to a log: the last line of defence.

The credentials check takes the credential out of each request before anything can log it; this
covers what is written before that (websockets logs the request line at DEBUG) or from other
places: a query parameter whose decoded name is ``token`` (``%74oken=``, ``TOKEN=``...), anything
shaped like a JWT, ``Bearer`` values and ``bearer.`` subprotocols, and a URL's password.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote_plus

from prefect_ws.backends.base import REDACTED, safe_url
from prefect_ws.server.security.auth import TOKEN_QUERY_PARAM

__all__ = ["REDACTED", "redact", "safe_url"]

_PARAM: Final = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#\s]{1,64})=(?P<value>[^&;#\s\"']*)")
_JWT: Final = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
_BEARER: Final = re.compile(r"(?i)(bearer[ .:=]+)[^\s,\"']+")
_USERINFO: Final = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]*@", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every credential-shaped part replaced by :data:`REDACTED`."""

    def param(match: re.Match[str]) -> str:
        name = unquote_plus(match.group("name")).strip().lower()
        if name != TOKEN_QUERY_PARAM:
            return match.group(0)
        return f"{match.group('lead')}{match.group('name')}={REDACTED}"

    text = _PARAM.sub(param, text)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    return _JWT.sub(REDACTED, text)
