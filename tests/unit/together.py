"""Requests sent to an engine at the same moment, from threads: what its batcher sees under
concurrent load (tests comparing each answer with the one the request gets alone)."""

from __future__ import annotations

import threading


def complete_together(engine, requests: list[tuple], timeout: float = 60.0) -> list:
    """`engine.complete(prompt, params)` for every (prompt, params) of `requests`, each on its
    own thread, all released at once by a barrier. Returns the answers in request order (None
    where a thread was still running after `timeout` seconds)."""
    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def run(i: int) -> None:
        start.wait()
        results[i] = engine.complete(*requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return results
