"""The loop <-> thread hand-offs of a server (kit/reader_pool.py): a module's :class:`Worker`
thread, and :func:`handed_back`, which brings thread results to the loop through one inbox per
loop, waking it once for results finished together (:func:`one_wake`, used by the SQLite
writer for each group)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from svcard.host.kit.reader_pool import Worker, handed_back, one_wake


def test_a_worker_runs_calls_in_order_on_one_thread_and_passes_errors_on() -> None:
    worker = Worker("w-test")
    try:
        seen: list[tuple[int, str]] = []
        futures = [worker.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
                   for i in range(20)]
        for f in futures:
            f.result(timeout=10)
        assert [i for i, _ in seen] == list(range(20))
        assert {name for _, name in seen} == {"w-test"}
        with pytest.raises(ZeroDivisionError):
            worker.submit(lambda: 1 / 0).result(timeout=10)
        assert worker.submit(lambda: 7).result(timeout=10) == 7   # the thread goes on
    finally:
        worker.shutdown()
    with pytest.raises(RuntimeError):
        worker.submit(lambda: 1)


def test_results_finished_together_wake_the_loop_once() -> None:
    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        wakes = 0
        real = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakes
            wakes += 1
            return real(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        done: list[Future[int]] = [Future() for _ in range(10)]
        mine = [handed_back(f) for f in done]

        def finish() -> None:
            with one_wake():
                for i, f in enumerate(done):
                    f.set_result(i)

        thread = threading.Thread(target=finish)
        thread.start()
        results = await asyncio.wait_for(asyncio.gather(*mine), 10)
        thread.join()
        return list(results), wakes

    results, wakes = asyncio.run(main())
    assert results == list(range(10))
    assert wakes == 1


def test_each_result_outside_one_wake_still_arrives() -> None:
    async def main() -> list[Any]:
        worker = Worker("w-each")
        try:
            calls = [handed_back(worker.submit(lambda i=i: i * 2)) for i in range(50)]
            calls.append(handed_back(worker.submit(lambda: 1 / 0)))
            return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        finally:
            worker.shutdown()

    results = asyncio.run(main())
    assert results[:50] == [i * 2 for i in range(50)]
    assert isinstance(results[50], ZeroDivisionError)


def test_a_cancelled_caller_whose_call_has_not_begun_skips_it() -> None:
    async def main() -> list[str]:
        worker = Worker("w-cancel")
        gate = threading.Event()
        ran: list[str] = []
        try:
            first = handed_back(worker.submit(lambda: gate.wait(10) and ran.append("first")))
            second = asyncio.ensure_future(handed_back(worker.submit(lambda: ran.append("x"))))
            await asyncio.sleep(0)
            second.cancel()
            await asyncio.sleep(0)
            gate.set()
            await asyncio.wait_for(first, 10)
            await asyncio.wait_for(handed_back(worker.submit(lambda: None)), 10)  # drained
            return ran
        finally:
            worker.shutdown()

    assert asyncio.run(main()) == ["first"]


def test_at_exit_a_worker_finishes_what_it_was_given_and_the_process_ends(
        tmp_path: Path) -> None:
    """As with a ThreadPoolExecutor: a PSAM's write under way at interpreter exit is finished,
    not cut off, and a worker never shut down does not keep the process alive."""
    done = tmp_path / "done"
    script = (
        "import time\n"
        "from pathlib import Path\n"
        "from svcard.host.kit.reader_pool import Worker\n"
        "w = Worker('exit-test')\n"
        "idle = Worker('never-used')\n"
        f"w.submit(lambda: (time.sleep(0.3), Path({str(done)!r}).write_text('x')))\n")
    finished = subprocess.run([sys.executable, "-c", script], timeout=60,
                              capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert done.read_text() == "x"
