"""The CPU transport: each kind of message as one gloo alltoall on a group that only this channel uses."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from blsgpu.counters.host import HostCounters
from blsgpu.errors import PeerFailure
from blsgpu.transport.base import blame_through_store, group_store, host_staging, next_channel_id


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
            return self._groups[kind].alltoall_base(out, inp, out_sizes, in_sizes)
        except Exception as e:
            raise _failure(e) from e

    @staticmethod
    def wait_all(work: Any, timeout_s: float) -> None:
        try:
            work.wait(_timeout(timeout_s))
        except Exception as e:
            raise _failure(e) from e

    order_all = wait_all  # host order is all there is on CPU

    @staticmethod
    def is_done(work: Any) -> bool:
        return work.is_completed()

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
        self._groups = []  # every work completed: the groups go quietly

    def abort(self) -> None:
        """Cancel what is still posted (the channel is being abandoned), without waiting."""
        for g in self._groups:
            try:
                g.abort()
            except Exception:
                pass
        self._groups = []  # aborted: dropping them now returns at once


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float) -> timedelta:
    """A wait's timeout as gloo takes it (made once per value: waits are on the hot path)."""
    return timedelta(seconds=max(seconds, 0.001))


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
