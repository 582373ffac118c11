"""Transports move bytes between ranks for the engine; they know nothing of iterations' meaning.

The engine asks a transport for two alltoallv's per iteration at most, each over flat uint8 buffers
with a byte count per rank (rank order, this rank included):

    alltoall(kind, k, out, out_sizes, inp, in_sizes) -> work
        kind MESSAGE: the fixed-size headers (and, where `inline_ok`, small payloads behind them:
        a receive region may be longer than what arrives in it); kind DATA: exactly sized payloads.
        Non-blocking; the works of one kind complete in the order they were posted, on every rank.
    wait_all(work, s)   the host blocks until the work is done (raises after s seconds)
    order_all(work, s)  what the caller runs next (its current stream) comes after the work
    blame(k, exc)   which peer a failure of iteration k came from, where the error does not say
                    (None: unknown); transports whose errors carry `.peer` need not look further

plus identity (rank, world_size, channel_id, name, device), `stream_ordered` (data completes on
streams: the engine hands it over with order()), `caller_may_receive` (the caller's thread may
process an iteration itself), `inline_ok`, empty(), make_counters(), agree_min(), optional
connect(s) and slot_written(k), close() and abort().

The CPU transport runs each kind as one torch.distributed alltoall on a gloo group of its own, so
a channel's traffic never shares a connection (or a failure) with the user's group or another
channel. Transports that only have point-to-point messages (NCCL through CuPy, blsgpu/transport/nccl.py, and
the in-process one, blsgpu/transport/local.py) get the alltoall from PointToPoint below.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from blsgpu.counters.host import HostCounters

# What the engine exchanges. The point-to-point transports keep their own tag spaces per kind.
MESSAGE = HEADER = 0
DATA = 1

_channel_counts: dict[Any, itertools.count] = {}


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


def gloo_backend_of(group: Any):
    """The ProcessGroupGloo that carries CPU traffic for `group` (None: default)."""
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call dist.init_process_group first "
            "(or use blsgpu.run_world)"
        )
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    inner = getattr(pg, "gloo", None)  # the "bls" backend's own gloo group
    if isinstance(inner, dist.ProcessGroupGloo):
        return inner
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
        inner = getattr(backend, "gloo", None)
        if isinstance(inner, dist.ProcessGroupGloo):
            return inner
        raise ValueError(
            f"the CPU backend of {pg!r} is {type(backend).__name__}, not gloo; the gloo transport "
            "needs gloo (init with backend 'gloo', 'bls' or 'cpu:gloo,cuda:nccl')"
        )
    return backend


def blame_through_store(store: Any, rank: int, world_size: int, k: int, grace_s: float,
                        shared: Any = None, window_s: float = 0.0) -> tuple[list[int], bool]:
    """The peers that did not report a failure within `grace_s`.

    A collective's error does not say which rank let it down. Every rank whose exchange fails says
    so under the channel's key in the group's store, then waits for the others to say so too: a
    rank that died, stopped, or left the channel does not. A live rank may be blocked on another
    channel of the same group, behind the same dead peer (it waits for data that this rank will
    only send once this channel moves), and reports its failure there. So each report is also
    written to `shared` (the group's own store) with its wall-clock time, and a report there
    within `window_s` of this one counts as well; an older one belongs to an earlier failure.
    Returns (silent peers, True), or (every peer, False) when there is no store or it did not
    answer.
    """
    peers = [p for p in range(world_size) if p != rank]
    if store is None or not peers:
        return peers, False
    try:
        now = time.time()
        store.set(f"failed/{rank}", str(k))
        if shared is not None:
            shared.set(f"blsgpu/failed/{rank}", f"{now:.3f}")

        def reported(p: int) -> bool:
            if store.check([f"failed/{p}"]):
                return True
            key = f"blsgpu/failed/{p}"
            return (shared is not None and shared.check([key])
                    and abs(float(shared.get(key)) - now) <= window_s)

        deadline = time.monotonic() + grace_s
        missing = peers
        while missing:
            missing = [p for p in missing if not reported(p)]
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return missing, True
    except Exception:
        return peers, False


class _Done:
    """A work that completed when it was posted (a world of one rank)."""

    @staticmethod
    def wait(timeout: Any = None) -> bool:
        return True

    @staticmethod
    def is_completed() -> bool:
        return True


class GlooTransport:
    """Each kind of message as one gloo alltoall on a group that only this channel uses."""

    name = "gloo"
    device = torch.device("cpu")
    stream_ordered = False
    inline_ok = True  # gloo accepts a receive region longer than the message that fills it
    caller_may_receive = True  # gloo calls may come from any thread

    def __init__(self, group: Any, timeout_s: float):
        base = gloo_backend_of(group)
        self.rank = base.rank()
        self.world_size = base.size()
        self.channel_id = _next_channel_id(group)
        self._base = base
        self._shared = group_store(group)
        self._timeout_s = timeout_s
        self._store = dist.PrefixStore(f"blsgpu/ch{self.channel_id}", self._shared)
        self._groups: list[Any] = []
        if self.world_size > 1:
            self._await_peers(timeout_s)
            timeout = timedelta(seconds=timeout_s)
            # Connecting is collective: every rank of the group builds the same two, in order.
            self._groups = [
                dist.ProcessGroupGloo(dist.PrefixStore(kind, self._store), self.rank,
                                      self.world_size, timeout)
                for kind in ("message", "data")
            ]

    def _await_peers(self, timeout_s: float) -> None:
        """Every rank of the group says it creates this channel: one that does not within the
        timeout is named (connecting would only say that some key never came)."""
        self._store.set(f"joined/{self.rank}", "1")
        keys = [f"joined/{p}" for p in range(self.world_size) if p != self.rank]
        try:
            self._store.wait(keys, timedelta(seconds=timeout_s))
        except Exception as e:
            missing = [p for p in range(self.world_size)
                       if p != self.rank and not self._store.check([f"joined/{p}"])]
            raise PeerFailure(
                f"rank(s) {missing or '?'} did not create channel {self.channel_id} of the group "
                f"within {timeout_s:.1f} s (a rank is silent, dead, or creates its channels in "
                f"another order)", missing[0] if missing else -1) from e

    def agree_min(self, value: int) -> int:
        """The smallest `value` over the group's ranks (a collective, at channel creation)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self._groups[0].allreduce([t], opts).wait()
        return int(t.item())

    @staticmethod
    def make_counters(world_size: int, rank: int, timeout_s: float) -> HostCounters:
        return HostCounters(world_size, rank)

    @staticmethod
    def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def alltoall(self, kind: int, k: int, out: torch.Tensor, out_sizes: list[int],
                 inp: torch.Tensor, in_sizes: list[int]) -> Any:
        if not self._groups:  # a world of one: the message to itself is all there is
            n = in_sizes[0]
            out[:n].copy_(inp[:n])
            return _Done
        return self._groups[kind].alltoall_base(out, inp, out_sizes, in_sizes)

    @staticmethod
    def wait_all(work: Any, timeout_s: float) -> None:
        work.wait(timedelta(seconds=max(timeout_s, 0.001)))

    order_all = wait_all  # host order is all there is on CPU

    def blame(self, k: int, exc: BaseException, grace_s: float) -> tuple[list[int], bool]:
        return blame_through_store(self._store, self.rank, self.world_size, k, grace_s,
                                   self._shared, self._timeout_s + grace_s)

    def close(self) -> None:
        self._groups = []  # every work completed: the groups go quietly

    def abort(self) -> None:
        """Cancel what is still posted (the channel is being abandoned), without waiting."""
        for g in self._groups:
            try:
                g.abort()
            except Exception:
                pass
        self._groups = []  # aborted: dropping them now returns at once


# ------------------------------------------------------------------------------------------------
# alltoall over point-to-point messages


@dataclass(eq=False)
class Batch:
    """The point-to-point works of one alltoall, with the peer of each."""

    works: list[tuple[int, Any]] = field(default_factory=list)


class PeerFailure(RuntimeError):
    """A point-to-point work failed; `peer` says with whom."""

    def __init__(self, message: str, peer: int):
        super().__init__(message)
        self.peer = peer


class PointToPoint:
    """alltoall() for transports that offer isend / irecv / flush / wait / order per message.

    Zero-byte messages are not sent. Without `loopback`, the part a rank sends itself is copied
    here (the transport cannot message its own rank).
    """

    loopback = True

    def alltoall(self, kind: int, k: int, out: torch.Tensor, out_sizes: list[int],
                 inp: torch.Tensor, in_sizes: list[int]) -> Batch:
        batch = Batch()
        o_out = _offsets(out_sizes)
        o_in = _offsets(in_sizes)
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

    @staticmethod
    def _each(fn: Any, batch: Batch, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for p, work in batch.works:
            try:
                fn(work, deadline - time.monotonic())
            except Exception as e:
                raise PeerFailure(str(e), getattr(e, "peer", p)) from e

    def blame(self, k: int, exc: BaseException, grace_s: float) -> tuple[list[int], bool]:
        peer = getattr(exc, "peer", None)
        return ([peer], True) if peer is not None else ([], False)

    def abort(self) -> None:
        pass


def _offsets(sizes: list[int]) -> list[int]:
    return list(itertools.accumulate(sizes, initial=0))
