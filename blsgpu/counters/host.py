"""Lag counters of one channel: posted / arrived / released iterations.

On CPU they are host integers. The GPU path keeps the same counters in device-visible memory too
(blsgpu/counters/device.py over kernels/lag_counters.cuh); the engine only calls the methods below,
so both paths run the same protocol code. Every count is "how many iterations", so it is k+1 once
iteration k is done.

Each count has one writer (posted and released: the caller's thread; arrived and what peers
reported: whichever thread processes the iteration, in iteration order), and a Python int
assignment is atomic, so the hot path takes no lock; the lock only makes snapshot() consistent
with what learn_all() reads of the peers.
"""

from __future__ import annotations

import threading


class HostCounters:
    """Posted / arrived / released counts of one rank, plus what it learned of its peers."""

    def __init__(self, world_size: int, rank: int):
        self.lock = threading.Lock()
        self.peers = [p for p in range(world_size) if p != rank]
        self.posted = 0
        self.arrived = 0
        self.released = 0
        # The release count each peer reported in its latest header.
        self.peer_released = [0] * world_size
        self._peer_posted_min = 0
        self.max_lag = 0

    def post(self, k: int) -> None:
        self.posted = k + 1
        lag = self.lag()
        if lag > self.max_lag:
            self.max_lag = lag

    def arrive(self, k: int) -> None:
        if k + 1 > self.arrived:
            self.arrived = k + 1

    def release(self, k: int) -> None:
        self.released = k + 1

    def complete(self, k: int, released: list[int]) -> None:
        """learn_all(k, released), arrive(k) and release(k) at once: an iteration whose caller
        read its headers and took its rows in one step (the host fast path)."""
        self.learn_all(k, released)
        self.arrive(k)
        self.release(k)

    def gate(self, k: int, bound: int) -> None:
        """Hold the comm stream before iteration k until `released` reaches k-B.

        Nothing to do on the host: exchange() already refuses to post k before the caller released
        k-B-1. Device counters enqueue the same condition as a stream wait.
        """

    def extra_stats(self) -> dict:
        """Counters beyond the host ones (the device copies on the GPU path); none here."""
        return {}

    def learn_all(self, k: int, released: list[int]) -> None:
        """Every peer's header for iteration k arrived; `released[p]` is what peer p reported.

        Headers may be read out of order (a caller's late gather of k after the progress thread
        read k+1): the latest iteration's news wins (a peer's release count never shrinks from
        one of its headers to the next).
        """
        with self.lock:
            if k + 1 > self._peer_posted_min:
                self._peer_posted_min = k + 1
                self.peer_released = released

    def snapshot(self) -> dict:
        """The counts at one instant, as a channel's stats() reports them."""
        with self.lock:
            return {
                "posted": self.posted,
                "arrived": self.arrived,
                "released": self.released,
                "lag": self.lag(),
                "max_lag": self.max_lag,
                "peer_posted_min": self.min_peer_posted(),
                "peer_released_min": self.min_peer_released(),
            }

    def lag(self) -> int:
        """Iterations this rank has posted that the slowest peer has not (as its headers told).

        Posting k needs iteration k-B-1 released, hence every peer's header k-B-1: the lag never
        exceeds B+1, and a rank held back by a slow peer sits at exactly B+1. Peers' own release
        counts (`peer_released`) are older news by the time they arrive, so they are not used.
        """
        if not self.peers:
            return 0
        return self.posted - self._peer_posted_min

    def min_peer_posted(self) -> int:
        if not self.peers:
            return self.posted
        return self._peer_posted_min

    def min_peer_released(self) -> int:
        if not self.peers:
            return self.released
        return min(self.peer_released[p] for p in self.peers)
