"""Clients of the stream: a Python library (:func:`follow`), the terminal renderer and ``tail``."""

from prefect_ws.clients.follow import StreamError, follow, follow_messages, stream_url

__all__ = ["StreamError", "follow", "follow_messages", "stream_url"]
