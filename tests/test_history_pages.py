"""History pages shared by the clients catching up on one run (server.history): read from the
backend once per page for every reader at the same time, complete pages kept within a bound."""

from __future__ import annotations

import asyncio

import pytest
from delivery_support import complete_draft, log_draft, new_run_id

from prefect_ws.backends.memory import MemoryBackend
from prefect_ws.server.history import HistoryPages

PAGE = 10


class CountingBackend(MemoryBackend):
    """The memory backend, counting its history reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[int] = []

    async def history(self, run_id: str, after: int, limit: int) -> list[str]:
        self.reads.append(after)
        await asyncio.sleep(0.01)  # a read that takes a while, as over the network
        return await super().history(run_id, after, limit)


async def _stored_run(backend: MemoryBackend, logs: int, *, complete: bool = True) -> str:
    run_id = new_run_id()
    await backend.publish(run_id, [log_draft(run_id, n) for n in range(logs)])
    if complete:
        await backend.publish(run_id, [complete_draft(run_id)])
    return run_id


def test_readers_of_a_page_at_the_same_time_share_one_read() -> None:
    async def main() -> None:
        backend = CountingBackend()
        run_id = await _stored_run(backend, 35)  # seq 1..36: pages after 0, 10, 20, 30
        pages = HistoryPages(backend, PAGE)
        got = await asyncio.gather(*(pages.after(run_id, "e", since) for since in (0, 3, 9) * 4))
        assert backend.reads == [0], "one read for the twelve readers of the first page"
        assert all(page is got[0] for page in got)
        assert [frame.seq for frame in got[0]] == list(range(1, 11))
        # A reader in the middle of a page gets the page from its boundary (it skips what it has).
        assert [f.seq for f in await pages.after(run_id, "e", 17)] == list(range(11, 21))
        assert [f.seq for f in await pages.after(run_id, "e", 30)] == [31, 32, 33, 34, 35, 36]
        assert backend.reads == [0, 10, 30]
        # Complete pages are kept (the last one ends the run: nothing can follow it).
        for since in (0, 5, 12, 33):
            await pages.after(run_id, "e", since)
        assert backend.reads == [0, 10, 30]
        # Another history (the backend restarted empty and the run began again): read anew.
        await pages.after(run_id, "other", 0)
        assert backend.reads == [0, 10, 30, 0]

    asyncio.run(main())


def test_the_page_at_the_head_of_a_live_run_is_read_again() -> None:
    async def main() -> None:
        backend = CountingBackend()
        run_id = await _stored_run(backend, 15, complete=False)
        pages = HistoryPages(backend, PAGE)
        assert [f.seq for f in await pages.after(run_id, "e", 10)] == [11, 12, 13, 14, 15]
        await backend.publish(run_id, [log_draft(run_id, 15)])
        assert [f.seq for f in await pages.after(run_id, "e", 15)] == list(range(11, 17))
        assert backend.reads == [10, 10]

    asyncio.run(main())


def test_kept_pages_stay_within_the_bound_newest_used_last_out() -> None:
    async def main() -> None:
        backend = CountingBackend()
        run_id = await _stored_run(backend, 200)
        first = await HistoryPages(backend, PAGE).after(run_id, "e", 0)
        pages = HistoryPages(backend, PAGE, max_bytes=6 * 2 * sum(len(f.data) for f in first))
        for since in range(0, 200, PAGE):
            await pages.after(run_id, "e", since)
        kept = [start for _, _, start in pages._kept]
        assert pages._kept_bytes <= pages.max_bytes
        assert 4 <= len(kept) <= 6 and kept == list(range(200 - PAGE * len(kept), 200, PAGE))
        backend.reads.clear()
        for since in (*kept, 0):
            await pages.after(run_id, "e", since)
        assert backend.reads == [0], "the newest pages were kept, the first was not"

    asyncio.run(main())


def test_a_reader_that_leaves_does_not_cancel_the_read_the_others_wait_for() -> None:
    async def main() -> None:
        backend = CountingBackend()
        run_id = await _stored_run(backend, 25)
        pages = HistoryPages(backend, PAGE)
        leaving = asyncio.create_task(pages.after(run_id, "e", 0))
        staying = asyncio.create_task(pages.after(run_id, "e", 0))
        await asyncio.sleep(0)
        leaving.cancel()
        assert [f.seq for f in await staying] == list(range(1, 11))
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert backend.reads == [0]

    asyncio.run(main())
