"""The shape of a request: a bounded header block and a path without control characters."""

from __future__ import annotations

import re
from typing import Final

from starlette.types import Scope

from prefect_ws.server.security.outcome import Check, Outcome, Refusal

MAX_HEADER_BYTES: Final = 16_384  # names and values of all headers together
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


class RequestShape(Check):
    """431 for a header block over :data:`MAX_HEADER_BYTES`; 400 for control characters in
    the decoded path (``%0d%0a`` and friends: no route has them, and no log line should)."""

    def check(self, scope: Scope, outcome: Outcome) -> None:
        if sum(len(k) + len(v) for k, v in scope.get("headers", [])) > MAX_HEADER_BYTES:
            raise Refusal(431, "request headers too large", "headers_too_large")
        if _CONTROL.search(scope["path"]):
            raise Refusal(400, "invalid characters in the request path", "invalid_path")
