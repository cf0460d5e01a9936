"""Review (R-speed) of this session's speed changes: breaks found, each with its test.

1. kit/reader_pool.py ``handed_back``: results finished together are delivered to the loop in one
   batch (``_Inbox.deliver``). An asyncio Future refuses a StopIteration (TypeError), and that
   TypeError ended the batch: every other waiter of the same wake-up (other draws' DB steps, in
   a writer group) then waited forever, their PSAMs never given back to the pool.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import pytest

from svcard.host.kit.reader_pool import Worker, handed_back, one_wake


def test_a_stopiteration_in_a_batch_does_not_strand_the_other_waiters() -> None:
    async def main() -> tuple[BaseException | None, int]:
        bad: Future[int] = Future()
        good: Future[int] = Future()
        first, second = handed_back(bad), handed_back(good)
        with one_wake():   # as the SQLite writer sets a whole group's results
            bad.set_exception(StopIteration())
            good.set_result(42)
        value = await asyncio.wait_for(second, 5)
        try:
            await asyncio.wait_for(first, 5)
        except TimeoutError:
            raise
        except Exception as exc:   # the error the caller gets instead
            return exc, value
        return None, value

    error, value = asyncio.run(main())
    assert value == 42
    assert isinstance(error, RuntimeError) and "StopIteration" in str(error)


def test_a_worker_call_raising_stopiteration_reaches_its_caller() -> None:
    worker = Worker("review3")

    def stops() -> int:
        raise StopIteration

    async def main() -> None:
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(handed_back(worker.submit(stops)), 5)
        assert await asyncio.wait_for(handed_back(worker.submit(lambda: 7)), 5) == 7

    try:
        asyncio.run(main())
    finally:
        worker.shutdown()
