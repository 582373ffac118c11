"""Transports move bytes between ranks for the engine; they know nothing of iterations' meaning.

A transport offers non-blocking point-to-point sends and receives of uint8 tensors, matched per
(peer, kind, iteration), and a blocking wait with a timeout. The CPU transport is torch.distributed's
gloo; the GPU transport (NCCL through CuPy, blsgpu/_nccl.py) and the in-process one
(blsgpu/_local.py) keep the same methods:

    rank, world_size, channel_id, name, device   identity; `device` holds the rings and receives
    loopback        True: the rank messages itself like any peer (the engine copies nothing itself)
    stream_ordered  True: data completes on streams; the engine hands it over with order(), and
                    only close() and blocking waits hold the host
    isend / irecv   post a message of (kind, k); may be deferred until flush(kind, k)
    flush(kind, k)  launch what was posted for (kind, k): one NCCL group on the GPU, nothing on gloo
    wait(work, s)   the host blocks until the work is done (raises TimeoutError after s seconds)
    order(work, s)  what the caller runs next (its current stream) comes after the work
    empty(...)      a buffer on `device` that the transport may write (allocated on its comm stream)
    make_counters   the lag counters that go with the transport (host or device)
    connect(s)      optional: set up every pair before the first iteration (NCCL), within s seconds
    close()
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from blsgpu._counters import HostCounters

# Message kinds; each gets its own tag space so headers and data never match each other.
HEADER = 0
DATA = 1
_KINDS = 2
_ITER_BITS = 16  # iterations in flight per pair are <= 2B+2, far below 2**16
_MAX_CHANNELS = (2**31 - 1) >> (_ITER_BITS + 1)

_channel_counts: dict[Any, int] = {}


def _group_key(group: Any) -> Any:
    """What identifies a group for as long as it lives, the same way on every rank.

    Not id(): torch hands out fresh Python wrappers of one C++ group, and a freed wrapper's id is
    reused, which restarted the count on some ranks and not others.
    """
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    try:
        name = pg.group_name
    except (AttributeError, RuntimeError):
        name = None
    return ("name", name) if name else ("object", id(pg))


def _next_channel_id(group: Any) -> int:
    # Channels are created collectively in the same order on every rank, so a per-group counter
    # gives the same id everywhere without a message.
    key = _group_key(group)
    n = _channel_counts.get(key, 0)
    if n >= _MAX_CHANNELS // _KINDS:
        raise RuntimeError(f"too many BLS channels on one process group ({n})")
    _channel_counts[key] = n + 1
    return n


def gloo_backend_of(group: Any):
    """The ProcessGroupGloo that carries CPU point-to-point traffic for `group` (None: default)."""
    from blsgpu._backend import BLSProcessGroup  # lazy: the backend imports the engine

    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call dist.init_process_group first "
            "(or use blsgpu.run_world)"
        )
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    if isinstance(pg, BLSProcessGroup):
        return pg.gloo
    if isinstance(pg, dist.ProcessGroupGloo):
        return pg
    try:
        backend = pg._get_backend(torch.device("cpu"))
    except (RuntimeError, ValueError) as e:
        raise ValueError(
            f"process group {pg!r} has no CPU backend; the gloo transport needs one "
            "(init with backend 'gloo', 'bls' or 'cpu:gloo,cuda:nccl')"
        ) from e
    if not isinstance(backend, dist.ProcessGroupGloo):
        raise ValueError(
            f"the CPU backend of {pg!r} is {type(backend).__name__}, not gloo; the gloo transport "
            "needs gloo (init with backend 'gloo', 'bls' or 'cpu:gloo,cuda:nccl')"
        )
    return backend


class GlooTransport:
    """Point-to-point over a gloo process group; tags keep channels, kinds and iterations apart."""

    name = "gloo"
    device = torch.device("cpu")
    loopback = False  # gloo cannot send to its own rank; the engine copies the self part
    stream_ordered = False
    inline_ok = True  # a receive may be longer than the message that fills it
    caller_may_receive = True  # gloo calls may come from any thread

    def __init__(self, group: Any = None):
        self.pg = gloo_backend_of(group)
        self.rank = self.pg.rank()
        self.world_size = self.pg.size()
        self.channel_id = _next_channel_id(group)

    def agree_min(self, value: int) -> int:
        """The smallest `value` over the group's ranks (a collective, at channel creation)."""
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.pg.allreduce([t], opts).wait()
        return int(t.item())

    @staticmethod
    def make_counters(world_size: int, rank: int, timeout_s: float) -> HostCounters:
        return HostCounters(world_size, rank)

    @staticmethod
    def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def _tag(self, kind: int, k: int) -> int:
        return ((self.channel_id * _KINDS + kind) << _ITER_BITS) | (k & ((1 << _ITER_BITS) - 1))

    def isend(self, buf: torch.Tensor, peer: int, kind: int, k: int):
        return self.pg.send([buf], peer, self._tag(kind, k))

    def irecv(self, buf: torch.Tensor, peer: int, kind: int, k: int):
        return self.pg.recv([buf], peer, self._tag(kind, k))

    @staticmethod
    def wait(req, timeout_s: float) -> None:
        # A gloo wait that times out closes the pair, so the engine waits once with all the time it
        # has and treats a timeout as final.
        req.wait(timedelta(seconds=max(timeout_s, 0.001)))

    order = wait  # host order is all there is on CPU

    def flush(self, kind: int, k: int) -> None:
        pass  # gloo posts each message at once

    def close(self) -> None:
        pass
