"""The torch.distributed backend "bls": async all_to_all_single runs through a BLS channel.

After ``dist.init_process_group("bls")`` (no ``import blsgpu`` needed: the package's entry point
registers the backend when torch is imported, see _autoload.py), ``dist.all_to_all_single(out, inp,
out_splits, in_splits, async_op=True)`` posts one iteration of a channel and returns a Work whose
``wait()`` fills ``out``; so does the functional ``all_to_all_single`` (always async). CPU tensors go
through a gloo channel; CUDA tensors through an NCCL channel on that device (the GPU path: CuPy's NCCL
bindings, stream-ordered hand-off, device lag counters). Everything else (barrier, all_reduce,
broadcast, all_gather, all_gather_into_tensor, reduce_scatter_tensor, blocking all_to_all_single,
monitored_barrier, ...) runs on an inner backend registered on the group per device, as torch
registers a built-in group's: gloo for CPU tensors, torch's NCCL for CUDA tensors. That registration
also carries the group's name, which functional collectives, init_device_mesh and TorchRec resolve
the group by. The lag bound comes from BLSGPU_BOUND (default 4): a backend is built by
torch.distributed, where no argument reaches.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.futures import Future

from blsgpu import _env
from blsgpu._env import BACKEND_NAME
from blsgpu.exchange.channel import BoundedLagAllToAll


class _BLSWork(dist.Work):
    """Work of one async all_to_all_single: wait() completes the exchange and fills `output`."""

    def __init__(self, handle, output: torch.Tensor):
        super().__init__()
        self._handle = handle
        self._output = output
        self._done = False

    def _complete(self) -> None:
        if not self._done:
            self._handle.wait()  # the rows land in `output` (exchange(out=output))
            self._done = True

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        self._complete()
        return True

    def is_completed(self) -> bool:
        return self._done or self._handle.done()

    def get_future(self) -> Future:
        # The engine has no callback hook into gloo; the future is completed by waiting here.
        self._complete()
        fut: Future = Future()
        fut.set_result([self._output])
        return fut


class BLSProcessGroup(dist.ProcessGroup):
    """A ProcessGroup whose async all_to_all_single is bounded-lag; the rest delegates per device."""

    def __init__(self, store, rank: int, world_size: int, timeout: timedelta):
        super().__init__(rank, world_size)
        self._store = store
        self._timeout = timeout
        self._channels: dict[str, Any] = {}
        # The inner backends are registered on the group itself, per device, as torch registers a
        # built-in group's: torch keeps the group's name in them (group_name, hence functional
        # collectives, init_device_mesh and TorchRec's ShardingEnv), and every collective torch
        # routes by device (all_gather_into_tensor, reduce_scatter_tensor, monitored_barrier, ...)
        # finds gloo for CPU tensors and NCCL for CUDA ones.
        self.gloo = dist.ProcessGroupGloo(dist.PrefixStore("blsgpu/gloo", store), rank, world_size, timeout)
        self._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, self.gloo)
        self._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        self._nccl = None  # torch's NCCL group for CUDA tensors
        if dist.is_nccl_available() and torch.cuda.is_available():
            try:
                self.inner_for(torch.device("cuda"))  # registered now; NCCL connects on first use
            except Exception:  # CPU use goes on; the first CUDA collective retries and raises
                self._nccl = None

    def getBackendName(self) -> str:  # torch's name
        return BACKEND_NAME

    @property
    def channel(self):
        """The CPU channel behind async all_to_all_single (created on first use)."""
        return self.channel_for(torch.device("cpu"))

    def channel_for(self, device: torch.device):
        """The BLS channel for tensors on `device`: gloo for CPU, NCCL for a CUDA device.

        Channels are created on first use; as with every channel, all ranks must first use the
        devices in the same order.
        """
        key = str(device)
        ch = self._channels.get(key)
        if ch is None:
            if device.type == "cpu":
                kind, where = "gloo", None
            elif device.type == "cuda":
                kind, where = "nccl", device
            else:
                raise ValueError(f"the 'bls' backend exchanges CPU or CUDA tensors, got a tensor on {device}")
            ch = BoundedLagAllToAll(
                self,
                bound=_env.backend_bound(),
                transport=kind,
                device=where,
                timeout=self._timeout,
                name=f"bls-backend-{device.type}",
            )
            self._channels[key] = ch
        return ch

    def channel_stats(self) -> dict[str, dict[str, Any]]:
        """stats() of every channel created so far, by device ("cpu", "cuda:0"); creates none."""
        return {key: ch.stats() for key, ch in self._channels.items()}

    def inner_for(self, device: torch.device):
        """The backend that runs every other operation for tensors on `device`."""
        if device.type == "cpu":
            return self.gloo
        if device.type != "cuda":
            raise ValueError(f"the 'bls' backend runs CPU or CUDA tensors, got a tensor on {device}")
        if self._nccl is None:
            if not dist.is_nccl_available():
                raise RuntimeError(
                    "the 'bls' backend got CUDA tensors, but this torch build has no NCCL; "
                    "install a CUDA build of torch, or keep the tensors on the CPU"
                )
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self._timeout
            self._nccl = dist.ProcessGroupNCCL(
                dist.PrefixStore("blsgpu/nccl", self._store), self.rank(), self.size(), opts
            )
            self._register_backend(torch.device("cuda"), dist.ProcessGroup.BackendType.NCCL, self._nccl)
            if self.group_name:  # registered after torch named the group: NCCL gets the name too
                self._set_group_name(self.group_name)
        return self._nccl

    def _inner(self, *tensors):
        return self.inner_for(_device_of(tensors))

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts):
        if output.device != input.device:
            raise ValueError(f"all_to_all_single: output is on {output.device} but input on {input.device}")
        if not getattr(opts, "asyncOp", True):
            return self._inner(input).alltoall_base(
                output, input, output_split_sizes, input_split_sizes, opts
            )
        w = self.size()
        if not input_split_sizes:
            if input.shape[0] % w:
                raise ValueError(f"input dim 0 ({input.shape[0]}) is not divisible by {w}")
            input_split_sizes = [input.shape[0] // w] * w
        if not output_split_sizes:
            if output.shape[0] % w:
                raise ValueError(f"output dim 0 ({output.shape[0]}) is not divisible by {w}")
            output_split_sizes = [output.shape[0] // w] * w
        if sum(output_split_sizes) != output.shape[0]:
            raise ValueError(
                f"output_split_sizes sum to {sum(output_split_sizes)} but output has {output.shape[0]} rows"
            )
        if output.shape[1:] != input.shape[1:]:
            raise ValueError(
                f"output trailing shape {list(output.shape[1:])} != input trailing shape "
                f"{list(input.shape[1:])}"
            )
        channel = self.channel_for(input.device)
        handle = channel.exchange(input, list(input_split_sizes), list(output_split_sizes), out=output)
        return _BLSWork(handle, output)

    # Everything else goes to the device's inner backend unchanged.
    def allreduce(self, tensors, opts):
        return self._inner(tensors).allreduce(tensors, opts)

    def allreduce_coalesced(self, tensors, opts):
        return self._inner(tensors).allreduce_coalesced(tensors, opts)

    def allgather(self, output_tensors, input_tensors, opts):
        return self._inner(input_tensors).allgather(output_tensors, input_tensors, opts)

    def _allgather_base(self, output, input, opts):
        return self._inner(input)._allgather_base(output, input, opts)

    def broadcast(self, tensors, opts):
        return self._inner(tensors).broadcast(tensors, opts)

    def barrier(self, opts):
        return self.gloo.barrier(opts)

    def reduce(self, tensors, opts):
        return self._inner(tensors).reduce(tensors, opts)

    def gather(self, output_tensors, input_tensors, opts):
        return self._inner(input_tensors).gather(output_tensors, input_tensors, opts)

    def scatter(self, output_tensors, input_tensors, opts):
        return self._inner(output_tensors).scatter(output_tensors, input_tensors, opts)

    def reduce_scatter(self, output_tensors, input_tensors, opts):
        return self._inner(output_tensors).reduce_scatter(output_tensors, input_tensors, opts)

    def alltoall(self, output_tensors, input_tensors, opts):
        return self._inner(input_tensors).alltoall(output_tensors, input_tensors, opts)

    def send(self, tensors, dst, tag):
        return self._inner(tensors).send(tensors, dst, tag)

    def recv(self, tensors, src, tag):
        return self._inner(tensors).recv(tensors, src, tag)

    def recv_anysource(self, tensors, tag):
        return self.gloo.recv_anysource(tensors, tag)  # NCCL has no receive from any source


def _device_of(tensors: Any) -> torch.device:
    """The device of the first tensor in (nested lists of) tensors; CPU when there is none."""
    stack = [tensors]
    while stack:
        t = stack.pop(0)
        if isinstance(t, torch.Tensor):
            return t.device
        if isinstance(t, (list, tuple)):
            stack = list(t) + stack
    return torch.device("cpu")
