"""Progress bars of `blsgpu run/bench` (tqdm, on stderr)."""

from __future__ import annotations

import sys
import threading

__all__ = ["RankBar", "WorldBar"]


class WorldBar:
    """tqdm over every rank's iterations of a local world; polls the shared counters
    (runner.Progress) from a thread, so the ranks never wait for the bar."""

    def __init__(self, progress, total: int, labels: list[str], enabled: bool):
        self._progress, self._labels = progress, labels
        self._stop = threading.Event()
        self._bar = None
        self._thread = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="it", desc="starting", dynamic_ncols=True, file=sys.stderr)
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            self._refresh()

    def _refresh(self) -> None:
        done, run = self._progress.read()
        self._bar.set_description(self._labels[run % len(self._labels)], refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._stop.set()
            self._thread.join()
            self._refresh()
            self._bar.close()


class RankBar:
    """The progress bar of rank 0 under torchrun (one process per rank, no launcher)."""

    def __init__(self, total: int, labels: list[str], enabled: bool):
        from tqdm import tqdm

        self._labels = labels
        self._bar = tqdm(total=total, unit="it", file=sys.stderr, disable=not enabled)

    def advance(self, rank: int, run: int) -> None:
        self._bar.set_description(self._labels[run % len(self._labels)], refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
