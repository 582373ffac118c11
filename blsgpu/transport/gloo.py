"""The CPU transport: each kind of message on a gloo group that only this channel uses.

DATA goes as one gloo alltoall. MESSAGE, in a world of few ranks (BLSGPU_GLOO_P2P_PEERS peers
at most, default 3), goes as one gloo send and one receive per peer, and its receives are posted
ahead (receive_ahead): the caller's thread hands them straight to the connections' loop thread,
and a peer's message lands as soon as it comes. An alltoall first goes through the group's work
queue to a worker thread, and back to the waiting caller when it is done: two thread hand-offs
more per iteration, which cost more than the bytes on a loaded host (perf/README.md, "Hot path,
fifth pass"). Each peer costs two Python calls, so larger worlds take the one alltoall.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from blsgpu._env import gloo_p2p_peers
from blsgpu.counters.host import HostCounters
from blsgpu.errors import PeerFailure
from blsgpu.transport.base import MESSAGE, blame_through_store, group_store, host_staging, next_channel_id


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


class _Done:
    """A work that completed when it was posted (a world of one rank)."""

    @staticmethod
    def wait(timeout: Any = None) -> bool:
        return True

    @staticmethod
    def is_completed() -> bool:
        return True


class _Messages:
    """The sends and receives of one MESSAGE exchange posted point to point: done when all are.

    A gloo point-to-point work says it is completed only once it was waited, so these are only
    ever waited (the engine polls no MESSAGE work: is_done() is asked of DATA works alone)."""

    __slots__ = ("works",)

    def __init__(self, works: list[Any]):
        self.works = works

    def wait(self, timeout: timedelta) -> bool:
        deadline = time.monotonic() + timeout.total_seconds()
        for w in self.works:
            w.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
        return True

    def is_completed(self) -> bool:
        raise TypeError("a point-to-point MESSAGE exchange is waited, never polled")


class GlooTransport:
    """Each kind of message on a gloo group that only this channel uses (the module docstring
    says how)."""

    name = "gloo"
    device = torch.device("cpu")
    stream_ordered = False
    inline_ok = True  # gloo accepts a receive region longer than the message that fills it
    caller_may_receive = True  # gloo calls may come from any thread

    def __init__(self, group: Any, timeout_s: float):
        base = gloo_backend_of(group)
        self.rank = base.rank()
        self.world_size = base.size()
        self.channel_id = next_channel_id(group)
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
                dist.ProcessGroupGloo(
                    dist.PrefixStore(kind, self._store), self.rank, self.world_size, timeout
                )
                for kind in ("message", "data")
            ]
        # MESSAGE point to point, its receives posted ahead (see the module docstring).
        self.receives_ahead = 0 < self.world_size - 1 <= gloo_p2p_peers()
        self._ahead: dict[int, Any] = {}  # iteration -> its MESSAGE receives, or why not posted

    def _await_peers(self, timeout_s: float) -> None:
        """Every rank of the group says it creates this channel: one that does not within the
        timeout is named (connecting would only say that some key never came)."""
        self._store.set(f"joined/{self.rank}", "1")
        keys = [f"joined/{p}" for p in range(self.world_size) if p != self.rank]
        try:
            self._store.wait(keys, timedelta(seconds=timeout_s))
        except Exception as e:
            missing = [
                p for p in range(self.world_size) if p != self.rank and not self._store.check([f"joined/{p}"])
            ]
            raise PeerFailure(
                f"rank(s) {missing or '?'} did not create channel {self.channel_id} of the group "
                f"within {timeout_s:.1f} s (a rank is silent, dead, or creates its channels in "
                f"another order)",
                missing[0] if missing else -1,
                PeerFailure.TIMED_OUT,
            ) from e

    def connect(self, timeout_s: float) -> None:
        """Connected already: the groups connect when they are built, in __init__."""

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

    def staging(self, device: torch.device) -> str | None:
        return host_staging(self.device, device)

    @staticmethod
    def slot_written(k: int) -> None:
        """Host memory: the slot is written when exchange() returns."""

    def alltoall(
        self,
        kind: int,
        k: int,
        out: torch.Tensor,
        out_sizes: list[int],
        inp: torch.Tensor,
        in_sizes: list[int],
    ) -> Any:
        if not self._groups:  # a world of one: the message to itself is all there is
            n = in_sizes[0]
            out[:n].copy_(inp[:n])
            return _Done
        try:
            if kind == MESSAGE and self.receives_ahead:
                return self._messages(k, out, out_sizes, inp, in_sizes)
            return self._groups[kind].alltoall_base(out, inp, out_sizes, in_sizes)
        except PeerFailure:
            raise
        except Exception as e:
            raise _failure(e) from e

    def receive_ahead(self, k: int, out: torch.Tensor, out_sizes: list[int]) -> None:
        """Post iteration k's MESSAGE receives now, into `out`, the buffer alltoall(MESSAGE, k)
        will name; the engine calls this in iteration order, once k's buffer is free. A receive
        that cannot be posted (a peer closed its channel, perhaps done with it) fails iteration k
        if it is ever posted, not now."""
        try:
            self._ahead[k] = self._receives(out, out_sizes)
        except Exception as e:
            self._ahead[k] = _failure(e)

    def _receives(self, out: torch.Tensor, out_sizes: list[int]) -> list[Any]:
        g, me = self._groups[MESSAGE], self.rank
        works = []
        at = 0
        for p, n in enumerate(out_sizes):
            if n and p != me:
                works.append(g.recv([out[at : at + n]], p, 0))
            at += n
        return works

    def _messages(
        self, k: int, out: torch.Tensor, out_sizes: list[int], inp: torch.Tensor, in_sizes: list[int]
    ) -> _Messages:
        """One MESSAGE exchange as a receive and a send per peer (empty ones left out), in one
        order on every rank, so that each pair's messages match in the order they were posted.
        A rank sends itself no message (its own sizes are 0: the engine knows its own header)."""
        g, me = self._groups[MESSAGE], self.rank
        works = self._ahead.pop(k, None)
        if works is None:
            works = self._receives(out, out_sizes)
        elif isinstance(works, PeerFailure):
            raise works
        at = 0
        for p, n in enumerate(in_sizes):
            if n and p != me:
                works.append(g.send([inp[at : at + n]], p, 0))
            at += n
        return _Messages(works)

    @staticmethod
    def wait_all(work: Any, timeout_s: float) -> None:
        try:
            work.wait(timedelta(seconds=max(timeout_s, 0.001)))
        except Exception as e:
            raise _failure(e) from e

    order_all = wait_all  # host order is all there is on CPU

    @staticmethod
    def is_done(work: Any) -> bool:
        return work.is_completed()  # DATA works only (see _Messages)

    def blame(self, k: int, exc: BaseException, grace_s: float) -> tuple[list[int], bool]:
        # A closed connection is seen at once, by each live rank when it next touches the dead
        # one: several may be silent for a while, so wait for them up to the timeout.
        closed = getattr(exc, "reason", None) == PeerFailure.CLOSED
        return blame_through_store(
            self._store,
            self.rank,
            self.world_size,
            k,
            grace_s,
            self._shared,
            self._timeout_s,
            patience_s=self._timeout_s if closed else 0.0,
        )

    def close(self) -> None:
        # Every work completed but the receives posted ahead, which no peer will fill: they go
        # with their groups.
        self._ahead.clear()
        self._groups = []

    def abort(self) -> None:
        """Cancel what is still posted (the channel is being abandoned), without waiting."""
        for g in self._groups:
            try:
                g.abort()
            except Exception:
                pass
        self._ahead.clear()
        self._groups = []  # aborted: dropping them now returns at once


def _failure(e: Exception) -> PeerFailure:
    """gloo's error as a PeerFailure: the peer unknown (blame() finds it), the reason read from
    gloo's words, the one place they are read (gloo's errors carry no code)."""
    text = str(e)
    low = text.lower()
    if "closed" in low or "reset" in low or "broken pipe" in low or "eof" in low:
        reason = PeerFailure.CLOSED
    elif "timed out" in low or "timeout" in low:
        reason = PeerFailure.TIMED_OUT
    elif "abort" in low:
        reason = PeerFailure.ABORTED
    else:
        reason = None
    return PeerFailure(text, -1, reason)
