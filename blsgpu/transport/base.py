"""Transports move bytes between ranks for the engine; they know nothing of iterations' meaning.

The engine asks a transport for two alltoallv's per iteration at most, each over flat uint8 buffers
with a byte count per rank (rank order, this rank included):

    alltoall(kind, k, out, out_sizes, inp, in_sizes) -> work
        kind MESSAGE: the fixed-size headers (and, where `inline_ok`, small payloads behind them:
        a receive region may be longer than what arrives in it); kind DATA: exactly sized payloads.
        Non-blocking; the works of one kind complete in the order they were posted, on every rank.
    wait_all(work, s)   the host blocks until the work is done (raises after s seconds)
    order_all(work, s)  what the caller runs next (its current stream) comes after the work
    is_done(work)       whether wait_all would return at once (host-ordered transports only)
    blame(k, exc)   which peer a failure of iteration k came from, where the error does not say
                    (None: unknown); transports whose errors carry `.peer` need not look further

plus identity (rank, world_size, channel_id, name, device), `stream_ordered` (data completes on
streams: the engine hands it over with order()), `caller_may_receive` (the caller's thread may
process an iteration itself), `inline_ok`, empty(), make_counters(), agree_min(), connect(s) (pairs
connect now rather than at first use; a no-op where they need not), slot_written(k) (the caller's
stream filled iteration k's send slot; a no-op off streams), staging(device) (why send tensors on
that device go through host memory, or None), close() and abort(). `Transport` below lists them
all; the engine calls nothing else. A failure to or from a peer raises PeerFailure with the peer
and, where the transport can tell, a reason (closed, timed out, aborted): the engine repeats it.

The CPU transport (gloo.py) runs each kind as one torch.distributed alltoall on a gloo group of its
own, so a channel's traffic never shares a connection (or a failure) with the user's group or
another channel. Transports that only have point-to-point messages (NCCL through CuPy, nccl.py, and
the in-process one, local.py) get the alltoall from PointToPoint below. This module also holds what
they share: channel ids per group, the group's store, and naming the peer behind a failure.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from blsgpu.counters.host import HostCounters
from blsgpu.errors import PeerFailure
from blsgpu.transport.sizes import offsets

# What the engine exchanges. The point-to-point transports keep their own tag spaces per kind.
MESSAGE = HEADER = 0
DATA = 1

_channel_counts: dict[Any, itertools.count] = {}


class Transport(Protocol):
    """Everything the engine (blsgpu.exchange) uses of a transport; the module docstring says why."""

    name: str
    rank: int
    world_size: int
    channel_id: int
    device: torch.device  # where empty() allocates and the send slots live
    stream_ordered: bool
    caller_may_receive: bool
    inline_ok: bool

    def connect(self, timeout_s: float) -> None: ...
    def agree_min(self, value: int) -> int: ...
    def make_counters(self, world_size: int, rank: int, timeout_s: float) -> HostCounters: ...
    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...
    def staging(self, device: torch.device) -> str | None: ...
    def slot_written(self, k: int) -> None: ...
    def alltoall(
        self,
        kind: int,
        k: int,
        out: torch.Tensor,
        out_sizes: list[int],
        inp: torch.Tensor,
        in_sizes: list[int],
    ) -> Any: ...
    def wait_all(self, work: Any, timeout_s: float) -> None: ...
    def order_all(self, work: Any, timeout_s: float) -> None: ...
    def is_done(self, work: Any) -> bool: ...
    def blame(self, k: int, exc: BaseException, grace_s: float) -> tuple[list[int], bool]: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def host_staging(own: torch.device, device: torch.device) -> str | None:
    """Why a transport whose buffers are on `own` stages send tensors on `device` through host
    memory every iteration, or None: CUDA tensors on a host transport."""
    if device.type == "cuda" and own.type != "cuda":
        return (
            "its CUDA tensors are staged through host memory every iteration (the host waits "
            "for the copy). Create it with device='cuda' for the GPU path (transport 'auto' "
            "then picks NCCL)."
        )
    return None


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


def next_channel_id(group: Any) -> int:
    """The group's next channel number: the same on every rank without a message, since channels
    are created collectively in the same order. Never reused, never exhausted."""
    counter = _channel_counts.setdefault(_group_key(group), itertools.count())
    return next(counter)


def group_store(pg: Any) -> Any:
    """The torch.distributed store of a process group (None: the default group)."""
    own = getattr(pg, "_store", None)  # the "bls" backend keeps the store it was built with
    if own is not None:
        return own
    c10d = dist.distributed_c10d
    if pg is None or pg is c10d._get_default_group():
        return c10d._get_default_store()
    getter = getattr(c10d, "_get_process_group_store", None)
    if getter is not None:
        return getter(pg)
    return c10d._world.pg_map[pg][1]


def blame_grace(timeout_s: float) -> float:
    """How long a failing rank waits for its peers' failure reports: a quarter of the channel's
    timeout, between 0.5 s and 3 s."""
    return min(3.0, max(0.5, 0.25 * timeout_s))


def blame_through_store(
    store: Any,
    rank: int,
    world_size: int,
    k: int,
    grace_s: float,
    shared: Any = None,
    timeout_s: float = 0.0,
    patience_s: float = 0.0,
) -> tuple[list[int], bool]:
    """The peers that did not report a failure within `grace_s`.

    A collective's error does not say which rank let it down. Every rank whose exchange fails says
    so under the channel's key in the group's store, then waits for the others to say so too: a
    rank that died, stopped, or left the channel does not. A live rank may be blocked on another
    channel of the same group, behind the same dead peer (it waits for data that this rank will
    only send once this channel moves), and reports its failure there. So each report is also
    written to `shared` (the group's own store) with its wall-clock time, and a report there
    within the channel's timeout plus the grace of this one counts as well (a rank blocked behind
    the same peer timed out at most that far apart); an older one belongs to an earlier failure.
    Returns (silent peers, True), or (every peer, False) when there is no store or it did not
    answer.

    `patience_s`: while more than one peer is silent after the grace, wait up to this long (from
    the start) for the others to report. For a failure seen at once (a closed connection: a peer
    died) the live ranks may not have noticed yet (another rank saw its connection close 2 s
    later in the fault tests), and only the dead one never reports.
    """
    peers = [p for p in range(world_size) if p != rank]
    if store is None or not peers:
        return peers, False
    try:
        now = time.time()
        window_s = timeout_s + grace_s
        store.set(f"failed/{rank}", str(k))
        if shared is not None:
            shared.set(f"blsgpu/failed/{rank}", f"{now:.3f}")

        def reported(p: int) -> bool:
            if store.check([f"failed/{p}"]):
                return True
            key = f"blsgpu/failed/{p}"
            return (
                shared is not None and shared.check([key]) and abs(float(shared.get(key)) - now) <= window_s
            )

        start = time.monotonic()
        deadline, patience = start + grace_s, start + max(grace_s, patience_s)
        missing = peers
        while missing:
            missing = [p for p in missing if not reported(p)]
            t = time.monotonic()
            if not missing or (t >= deadline and (len(missing) == 1 or t >= patience)):
                break
            time.sleep(0.05)
        return missing, True
    except Exception:
        return peers, False


# ------------------------------------------------------------------------------------------------
# alltoall over point-to-point messages


@dataclass(eq=False)
class Batch:
    """The point-to-point works of one alltoall, with the peer of each."""

    works: list[tuple[int, Any]] = field(default_factory=list)


class PointToPoint:
    """alltoall() for transports that offer isend / irecv / flush / wait / order / test per message.

    Zero-byte messages are not sent. Without `loopback`, the part a rank sends itself is copied
    here (the transport cannot message its own rank). A failure of one message raises PeerFailure
    naming its peer (unless the transport's own error names another, or None: unknown) and keeping
    the transport's reason.
    """

    loopback = True
    inline_ok = False  # an exactly sized receive per message: nothing rides behind a header

    def connect(self, timeout_s: float) -> None:
        """Pairs connect at their first message."""

    def slot_written(self, k: int) -> None:
        """Nothing to mark off streams."""

    def staging(self, device: torch.device) -> str | None:
        return host_staging(self.device, device)

    def alltoall(
        self,
        kind: int,
        k: int,
        out: torch.Tensor,
        out_sizes: list[int],
        inp: torch.Tensor,
        in_sizes: list[int],
    ) -> Batch:
        batch = Batch()
        o_out = offsets(out_sizes)
        o_in = offsets(in_sizes)
        me = self.rank
        for p in range(self.world_size):
            n = out_sizes[p]
            if n and (p != me or self.loopback):
                batch.works.append((p, self.irecv(out[o_out[p] : o_out[p] + n], p, kind, k)))
        for p in range(self.world_size):
            n = in_sizes[p]
            if n and (p != me or self.loopback):
                batch.works.append((p, self.isend(inp[o_in[p] : o_in[p] + n], p, kind, k)))
        if not self.loopback and in_sizes[me]:
            n = in_sizes[me]
            out[o_out[me] : o_out[me] + n].copy_(inp[o_in[me] : o_in[me] + n])
        self.flush(kind, k)
        return batch

    def wait_all(self, batch: Batch, timeout_s: float) -> None:
        self._each(self.wait, batch, timeout_s)

    def order_all(self, batch: Batch, timeout_s: float) -> None:
        self._each(self.order, batch, timeout_s)

    def is_done(self, batch: Batch) -> bool:
        test = self.test
        return all(test(work) for _, work in batch.works)

    @staticmethod
    def _each(fn: Any, batch: Batch, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for p, work in batch.works:
            try:
                fn(work, deadline - time.monotonic())
            except Exception as e:
                raise PeerFailure(str(e), getattr(e, "peer", p), getattr(e, "reason", None)) from e

    def blame(self, k: int, exc: BaseException, grace_s: float) -> tuple[list[int], bool]:
        peer = getattr(exc, "peer", None)
        return ([peer], True) if peer is not None else ([], False)

    def abort(self) -> None:
        pass
