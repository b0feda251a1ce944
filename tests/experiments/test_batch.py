"""experiments.batch's pool helpers (shared with the sweep's local executor)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from eptlab.experiments.batch import as_finished


def test_as_finished_yields_every_result_and_cancels_the_rest_when_stopped() -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert sorted(as_finished([pool.submit(pow, 2, k) for k in range(5)])) == [
            1, 2, 4, 8, 16]
    gate = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = [pool.submit(lambda: 1)] + [pool.submit(gate.wait) for _ in range(3)]
        results = as_finished(futures)
        assert next(results) == 1
        results.close()  # the caller stops early: the queued ones never start
        gate.set()
    assert futures[-1].cancelled() and futures[-2].cancelled()
