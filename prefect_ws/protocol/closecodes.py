"""WebSocket close codes prefect-ws uses, each with one meaning clients can act on."""

from typing import Final

RUN_COMPLETE: Final = 1000  # the run's run_complete was delivered; nothing more will come
GOING_AWAY: Final = 1001  # the server is shutting down; reconnect with since=<last seq>
MESSAGE_TOO_BIG: Final = 1009  # the client sent a frame over PREFECT_WS_MAX_INBOUND_BYTES
INTERNAL_ERROR: Final = 1011  # unexpected server error; reconnect with since=<last seq>
# The process is restarting or stopping (uvicorn closes every stream with it on shutdown, e.g.
# a worker of `serve --workers N` replaced); reconnect with since=<last seq>.
SERVICE_RESTART: Final = 1012
TRY_AGAIN_LATER: Final = 1013  # the client fell behind; reconnect with since=<last seq>
UNKNOWN_RUN: Final = 4404  # no events for this run id (add wait=<seconds> to wait for it)
INVALID_REQUEST: Final = 4400  # malformed run id or query parameter; do not retry unchanged
# The stream's token expired; reconnect with a fresh token and since=<last seq>.
TOKEN_EXPIRED: Final = 4401
