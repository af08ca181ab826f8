"""The serving side: the Starlette app that fans each run's events out to its clients.

:mod:`.app` builds the app; :mod:`.hub` holds one backend subscription per watched run per
process; :mod:`.streams` turns a request into a stream, sent as WebSocket frames (:mod:`.app`),
Server-Sent Events (:mod:`.sse`) or JSON pages; :mod:`.security` checks every request;
:mod:`.uvicorn` fences what prefect-ws builds on uvicorn's and websockets' internals.
"""
