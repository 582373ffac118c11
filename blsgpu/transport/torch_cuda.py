"""Every CUDA call the NCCL transport makes, through torch, in one small class.

Kept this thin so that the transport's logic (groups, staging, ordering, the watchdog) runs on a
CPU against a fake with the same methods (tests/test_gpu_path_cpu.py).
"""

from __future__ import annotations

from typing import Any

import torch

from blsgpu.counters import device as _device


class TorchCuda(_device.TorchEvents):
    """Streams, copies, host waits, pinned and device buffers, and the device counters (events,
    the current stream and the device come from the counters' TorchEvents)."""

    def new_stream(self) -> Any:
        return _device.own_stream(self.device)

    def use(self, stream: Any) -> Any:
        return torch.cuda.stream(stream)

    @staticmethod
    def handle(stream: Any) -> int:
        return stream.cuda_stream

    @staticmethod
    def copy_async(dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    @staticmethod
    def record_stream(t: torch.Tensor, stream: Any) -> None:
        t.record_stream(stream)

    @staticmethod
    def host_wait(event: Any, timeout_s: float) -> bool:
        return _device.host_wait(event, timeout_s)

    @staticmethod
    def pinned(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def counters(self, world_size: int, rank: int, stream: Any, timeout_s: float) -> Any:
        return _device.DeviceCounters(world_size, rank, self.device, stream, timeout_s, events=self)
