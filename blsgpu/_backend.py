"""The torch.distributed backend "bls": async all_to_all_single runs through a BLS channel.

After ``dist.init_process_group("bls")``, ``dist.all_to_all_single(out, inp, out_splits, in_splits,
async_op=True)`` posts one iteration of the group's channel and returns a Work whose ``wait()``
fills ``out``. Everything else typical inference code calls (barrier, all_reduce, broadcast,
all_gather, blocking all_to_all_single, ...) delegates to an inner gloo group. The lag bound comes
from BLSGPU_BOUND (default 4): a backend is built by torch.distributed, where no argument reaches.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.futures import Future

from blsgpu import _env

BACKEND_NAME = "bls"


class _BLSWork(dist.Work):
    """Work of one async all_to_all_single: wait() completes the exchange and fills `output`."""

    def __init__(self, handle, output: torch.Tensor):
        super().__init__()
        self._handle = handle
        self._output = output
        self._done = False

    def _complete(self) -> None:
        if not self._done:
            recv, _ = self._handle.wait()
            self._output.copy_(recv.view(self._output.shape))
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
    """A ProcessGroup whose async all_to_all_single is bounded-lag; the rest delegates to gloo."""

    def __init__(self, store, rank: int, world_size: int, timeout: timedelta):
        super().__init__(rank, world_size)
        self.gloo = dist.ProcessGroupGloo(
            dist.PrefixStore("blsgpu/gloo", store), rank, world_size, timeout
        )
        self._timeout = timeout
        self._channel = None

    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return BACKEND_NAME

    @property
    def channel(self):
        """The BLS channel behind async all_to_all_single (created on first use)."""
        if self._channel is None:
            from blsgpu._exchange import BoundedLagAllToAll

            self._channel = BoundedLagAllToAll(
                self, bound=_env.backend_bound(), transport="gloo", timeout=self._timeout,
                name="bls-backend",
            )
        return self._channel

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts):
        if not getattr(opts, "asyncOp", True):
            return self.gloo.alltoall_base(
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
                f"output_split_sizes sum to {sum(output_split_sizes)} but output has "
                f"{output.shape[0]} rows"
            )
        if output.shape[1:] != input.shape[1:]:
            raise ValueError(
                f"output trailing shape {list(output.shape[1:])} != input trailing shape "
                f"{list(input.shape[1:])}"
            )
        handle = self.channel.exchange(input, list(input_split_sizes), list(output_split_sizes))
        return _BLSWork(handle, output)

    # Everything else goes to gloo unchanged.
    def allreduce(self, tensors, opts):
        return self.gloo.allreduce(tensors, opts)

    def allreduce_coalesced(self, tensors, opts):
        return self.gloo.allreduce_coalesced(tensors, opts)

    def allgather(self, output_tensors, input_tensors, opts):
        return self.gloo.allgather(output_tensors, input_tensors, opts)

    def _allgather_base(self, output, input, opts):
        return self.gloo._allgather_base(output, input, opts)

    def broadcast(self, tensors, opts):
        return self.gloo.broadcast(tensors, opts)

    def barrier(self, opts):
        return self.gloo.barrier(opts)

    def reduce(self, tensors, opts):
        return self.gloo.reduce(tensors, opts)

    def gather(self, output_tensors, input_tensors, opts):
        return self.gloo.gather(output_tensors, input_tensors, opts)

    def scatter(self, output_tensors, input_tensors, opts):
        return self.gloo.scatter(output_tensors, input_tensors, opts)

    def reduce_scatter(self, output_tensors, input_tensors, opts):
        return self.gloo.reduce_scatter(output_tensors, input_tensors, opts)

    def alltoall(self, output_tensors, input_tensors, opts):
        return self.gloo.alltoall(output_tensors, input_tensors, opts)

    def send(self, tensors, dst, tag):
        return self.gloo.send(tensors, dst, tag)

    def recv(self, tensors, src, tag):
        return self.gloo.recv(tensors, src, tag)

    def recv_anysource(self, tensors, tag):
        return self.gloo.recv_anysource(tensors, tag)


def _create(store, rank: int, world_size: int, timeout: timedelta) -> BLSProcessGroup:
    return BLSProcessGroup(store, rank, world_size, timeout)


def _register() -> None:
    if BACKEND_NAME.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND_NAME, _create, devices=["cpu"])


if dist.is_available():
    _register()
