"""The lease race shared by the local (no flock) and the S3 lease tests: 8 writers ask at once, one wins."""

from __future__ import annotations

import threading

from tcskd.store.registry import Lease, WriterLock


def assert_one_of_eight_wins(cache, leases: list[Lease]) -> None:
    """Let ``leases`` (8, on ``cache``) try to take it at the same moment: exactly one wins, every loser is told
    the winner's name; then the winner releases and no writer holds ``cache``."""
    results: list = [None] * len(leases)
    go = threading.Barrier(len(leases))

    def take(i: int) -> None:
        go.wait()
        results[i] = leases[i].try_acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1, results
    assert all(r.writer == leases[winners[0]].writer for r in results if r is not None)
    leases[winners[0]].release()
    assert not WriterLock.is_held(cache)
