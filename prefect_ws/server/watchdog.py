"""One task per server that ends sends stuck on a client that stopped reading.

A send blocks while the connection's write buffer is full. Timing each send with its own timer
(``asyncio.timeout``) meant arming and cancelling one per send per client, which showed in the
fan-out profiles, and a watchdog task per connection cost memory on every idle connection. Here
a send only records when it started; one task looks a few times per ``timeout`` and cancels the
task of a send that has been blocked for longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator


class SendTimeout(Exception):
    """A send stayed blocked for longer than the watchdog's timeout."""


class SendWatchdog:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._sending: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="prefect-ws send watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def sending(self, task: asyncio.Task[object] | None = None) -> Iterator[None]:
        """Around one write: raises :class:`SendTimeout` if the watchdog had to end it.

        Pass the sending task when it is known: ``asyncio.current_task()`` makes a ``getpid``
        system call each time (CPython checks the running loop against forks), and at one
        event per message that was a fifth of the server's time in the fan-out profiles.
        """
        task = task or asyncio.current_task()
        assert task is not None
        self._sending[task] = time.monotonic()
        try:
            yield
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            self._expired.discard(task)
            task.uncancel()
            raise SendTimeout(f"send blocked for over {self.timeout:g} s") from None
        finally:
            self._sending.pop(task, None)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.timeout / 4)
            now = time.monotonic()
            for task, since in list(self._sending.items()):
                if now - since > self.timeout and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()
