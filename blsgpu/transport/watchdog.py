"""The watchdog of a stream-ordered channel: no device wait outlives the channel's timeout.

A group on a CUDA stream never waits on the host, so a dead or silent peer would leave its stream
hung and nobody would notice. The watchdog follows every group in flight by two events: `start`
(the stream reached the group) and `end` (it completed). A group whose stream reached it and that
has not completed within the timeout is late, and the watchdog says so once through `on_late`
(the transport then names the peer and aborts). A group still behind its gate or behind an earlier
group is not late: the consumer or the earlier group is, and that one is watched.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

_TICK_S = 0.1  # how often the watchdog looks (at most; a tenth of the timeout if shorter)


class _Watched:
    """A group followed: `since` is when the watchdog first saw `start` done (-1: completed)."""

    __slots__ = ("start", "end", "comm", "k", "since")

    def __init__(self, start: Any, end: Any, comm: str, k: int):
        self.start, self.end, self.comm, self.k, self.since = start, end, comm, k, None


class Watchdog:
    """Follows groups (`watch`) on a thread of its own (`start`) until `stop`; `on_late(comm, k)`
    is called once for the first late group."""

    def __init__(self, timeout_s: float, on_late: Callable[[str, int], None], name: str):
        self.timeout_s = timeout_s
        self.watched: collections.deque[_Watched] = collections.deque()
        self._on_late = on_late
        self._name = name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name=self._name)
        self._thread.start()

    def stop(self, join_s: float = 0.0) -> None:
        """Stop looking; with join_s, wait that long for the thread (not from the thread itself)."""
        self._stop.set()
        thread = self._thread
        if join_s > 0 and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=join_s)

    def watch(self, start: Any, end: Any, comm: str, k: int) -> None:
        with self._lock:
            self.watched.append(_Watched(start, end, comm, k))

    def _loop(self) -> None:
        tick = min(_TICK_S, max(self.timeout_s / 10, 0.005))
        while not self._stop.wait(tick):
            if self.look():
                return

    def look(self) -> bool:
        """One look at every group in flight; True when one was late (and reported)."""
        with self._lock:
            watched = list(self.watched)
        now = time.monotonic()
        late = None
        finished = 0
        for w in watched:
            if w.end.query():
                finished += 1
                w.since = -1.0
                continue
            if w.since is None:
                if w.start.query():
                    w.since = now
            elif now - w.since > self.timeout_s and late is None:
                late = w
        if finished:
            with self._lock:
                self.watched = collections.deque(w for w in self.watched if w.since != -1.0)
        if late is None or self._stop.is_set():
            return False
        self._stop.set()
        self._on_late(late.comm, late.k)
        return True
