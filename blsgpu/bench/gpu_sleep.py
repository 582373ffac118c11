"""A delay on the GPU: the current stream stays busy for a given time while the host goes on."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["gpu_sleep"]


def gpu_sleep(seconds: float, device: torch.device | None = None) -> None:
    """Keep the current stream busy for `seconds` (a kernel; the host does not wait).

    The sleep kernel of kernels/lag_counters.cu counts wall-clock time (%globaltimer). Without
    CuPy to compile it, torch.cuda._sleep, which counts SM cycles, converted at a rate measured
    once with the clocks up (an idle GPU runs its cycles several times slower).
    """
    if seconds <= 0:
        return
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    ops = _sleep_ops(index)
    if ops is not None:
        ops.sleep(torch.cuda.current_stream(index), seconds)
    else:
        torch.cuda._sleep(max(1, int(seconds * _cycles_per_s(index))))


_sleepers: dict[int, Any] = {}


def _sleep_ops(index: int) -> Any:
    if index not in _sleepers:
        from blsgpu.counters import device as dc  # GPU only

        try:
            _sleepers[index] = dc.stream_ops(torch.device("cuda", index), "kernel")
        except Exception:  # no CuPy / NVRTC: the cycle-count sleep
            _sleepers[index] = None
    return _sleepers[index]


_rates: dict[int, float] = {}


def _cycles_per_s(index: int) -> float:
    rate = _rates.get(index)
    if rate is None:
        # torch.cuda._sleep counts clock cycles; time a few on a side stream to convert, after
        # a long one that brings the clocks up.
        stream = torch.cuda.Stream(index)
        rates = []
        with torch.cuda.stream(stream):
            torch.cuda._sleep(200_000_000)
            for cycles in (2_000_000, 2_000_000, 2_000_000):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.cuda._sleep(cycles)
                end.record()
                end.synchronize()
                rates.append(cycles / (start.elapsed_time(end) / 1e3))
        rate = sorted(rates)[1]
        _rates[index] = rate
    return rate
