"""The exchange contract's worlds and seeded workloads, shared by every transport's tests.

A World runs ranks one way (processes over gloo, threads over the in-process transport, threads
over NCCL on a fake CUDA, processes over NCCL on GPUs); the `world` fixture of tests/conftest.py
gives one per transport, and tests/test_contract.py runs each contract case once through it. Inside
a rank, channel() builds a channel of the running world's transport and die() ends the rank as a
crash would, so a case's body reads the same whatever runs it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from blsgpu import BoundedLagAllToAll, run_world
from blsgpu.errors import RankError
from blsgpu.transport.local import run_local

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]


def variants(width: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, trailing dims) cycled over iterations: every dtype, 1-D and 2-D [n, width]."""
    return [(dt, tr) for dt in DTYPES for tr in [(), (width,)]]


def split_matrix(seed: int, k: int, w: int, rows: int = 7) -> np.ndarray:
    """splits[src, dst] for iteration k: random below `rows`, many zeros, and now and then a
    silent sender."""
    g = np.random.default_rng([seed, k])
    m = g.integers(0, rows, size=(w, w))
    m[g.random((w, w)) < 0.3] = 0
    if k % 5 == 2:
        m[k % w, :] = 0  # this rank sends nothing at all
    return m


def payload(seed: int, k: int, src: int, n: int, dtype: torch.dtype, trailing) -> torch.Tensor:
    """What rank `src` sends in iteration k (all destinations, in rank order)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + k * 1009 + src)
    x = torch.randn((n, *trailing), generator=g) * 1000
    return x.to(dtype) if dtype.is_floating_point else x.round().to(dtype)


def send_of(seed: int, k: int, rank: int, w: int, width: int, rows: int = 7):
    """(send tensor, send_splits, recv_splits) of `rank` in iteration k."""
    dtype, trailing = variants(width)[k % (2 * len(DTYPES))]
    m = split_matrix(seed, k, w, rows)
    return payload(seed, k, rank, int(m[rank].sum()), dtype, trailing), m[rank].tolist(), m[:, rank].tolist()


def reference(seed: int, k: int, rank: int, w: int, width: int, rows: int = 7) -> torch.Tensor:
    """What a synchronous all_to_all_single delivers to `rank` in iteration k, computed locally."""
    dtype, trailing = variants(width)[k % (2 * len(DTYPES))]
    m = split_matrix(seed, k, w, rows)
    parts = []
    for src in range(w):
        send = payload(seed, k, src, int(m[src].sum()), dtype, trailing)
        lo = int(m[src, :rank].sum())
        parts.append(send[lo : lo + int(m[src, rank])])
    return torch.cat(parts)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
        )
    )


def drive(
    a2a,
    rank: int,
    w: int,
    iters: int,
    seed: int,
    width: int,
    expected: Callable[[int], torch.Tensor],
    mean_delay_s: float,
) -> list[int]:
    """Run `iters` exchanges with seeded delays, keeping a random 1..B+1 outstanding (half of them
    with known recv_splits, every fourth waited with blocking=True); return the iterations whose
    data or splits differ from expected(k)."""
    rng = np.random.default_rng([seed, rank, 7])
    delays = rng.exponential(mean_delay_s, size=iters) * (rng.random(iters) < 0.4)
    window = rng.integers(1, a2a.bound + 2, size=iters)
    bad: list[int] = []
    pending = []

    def check(k, handle):
        recv, recv_splits = handle.wait(blocking=k % 4 == 1)
        want_splits = split_matrix(seed, k, w)[:, rank].tolist()
        if not same_bits(recv.cpu(), expected(k)) or recv_splits != want_splits:
            bad.append(k)

    for k in range(iters):
        send, send_splits, recv_splits = send_of(seed, k, rank, w, width)
        send = send.to(a2a.device)
        pending.append((k, a2a.exchange(send, send_splits, recv_splits if k % 2 else None)))
        while len(pending) >= window[k]:
            check(*pending.pop(0))
        time.sleep(delays[k])
    for item in pending:
        check(*item)
    return bad


def bounded_body(rank, w, bound, iters, slow_rank, slow_s):
    """Pipelined driver: post k, then wait k-B. The slow rank sleeps between the two (its compute),
    which is when the others can run B+1 iterations ahead of its releases. Returns the time each
    iteration finished (wait returned) and the channel's stats."""
    finished = []
    with channel(bound=bound, timeout=60) as a2a:
        handles = []
        for k in range(iters + bound):
            if k < iters:
                handles.append(a2a.exchange(torch.full((w,), float(k), device=a2a.device), [1] * w))
            if rank == slow_rank:
                time.sleep(slow_s)
            if k >= bound:
                recv, _ = handles.pop(0).wait()
                finished.append(time.monotonic())
                assert recv.tolist() == [float(k - bound)] * w
        return finished, a2a.stats()


def assert_bounded(finished: list[list[float]], bound: int, slow: int) -> None:
    """No rank finished iteration k before every peer released (finished) k-B-1, and every rank
    but the slow one got exactly B+1 iterations ahead of it."""
    w, iters = len(finished), len(finished[0])
    for r in range(w):
        for k in range(bound + 1, iters):
            for p in range(w):
                assert finished[r][k] >= finished[p][k - bound - 1], (r, p, k)
    for r in range(w):
        if r == slow:
            continue
        ahead = max((k + 1) - sum(t <= finished[r][k] for t in finished[slow]) for k in range(iters))
        assert ahead == bound + 1, f"rank {r} got {ahead} ahead, expected {bound + 1}"


# ------------------------------------------------------------------------------------------------
# worlds: how ranks run, which transport their channels take, how a rank dies


class RankDied(Exception):
    """What a rank thread raises to die: a thread cannot exit the way a crashed process does."""


@dataclass(frozen=True)
class World:
    """One way to run ranks: processes (run_world) or threads (run_local, with its options), and
    the transport their channels ask for, which their stats() then report."""

    name: str
    transport: str
    threads: bool
    options: dict = field(default_factory=dict)
    cuda: bool = False  # one GPU per rank (NCCL); needs as many GPUs as ranks
    fakes: Any = field(default=None, compare=False)  # (FakeNccl, transports built per rank)

    @property
    def stream_ordered(self) -> bool:
        """The engine's stream-ordered path: device counters, header-less known_splits."""
        return self.transport == "nccl" or bool(self.options.get("emulate_streams"))

    def run(
        self,
        world_size: int,
        body: Callable,
        *args: Any,
        timeout_s: float = 120.0,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """body(rank, world_size, *args) on every rank; each rank's result (or exception)."""
        if self.cuda and torch.cuda.device_count() < world_size:
            pytest.skip(f"needs {world_size} CUDA GPUs; {torch.cuda.device_count()} visible")
        if not self.threads:
            return run_world(
                world_size,
                _as_rank,
                self,
                body,
                *args,
                timeout_s=timeout_s,
                return_exceptions=return_exceptions,
            )
        global _world
        _world = self
        try:
            return run_local(
                world_size,
                body,
                *args,
                timeout_s=timeout_s,
                return_exceptions=return_exceptions,
                **self.options,
            )
        finally:
            _world = None

    def assert_died(self, result: Any) -> None:
        """The launcher's verdict on a rank that called die()."""
        if self.threads:
            assert isinstance(result, RankDied), repr(result)
        else:
            assert isinstance(result, RankError) and "died" in str(result), repr(result)


WORLDS = {
    "gloo": World("gloo", "gloo", threads=False),
    "local": World("local", "local", threads=True),
    "local-streams": World(
        "local-streams", "local", threads=True, options={"loopback": True, "emulate_streams": True}
    ),
    "nccl-fakes": World("nccl-fakes", "nccl", threads=True),
    "nccl-gpu": World("nccl-gpu", "nccl", threads=False, cuda=True),
}

_world: World | None = None  # the world this rank runs in


def _as_rank(rank: int, world_size: int, world: World, body: Callable, *args: Any) -> Any:
    """A process rank's entry: remember its world (and take its GPU), then run the body."""
    global _world
    _world = world
    if world.cuda:
        torch.cuda.set_device(rank)
    return body(rank, world_size, *args)


def channel(**kwargs: Any) -> BoundedLagAllToAll:
    """A channel of the running world's transport, on this rank's device (its tensors go to
    a2a.device)."""
    device = torch.device("cuda", torch.cuda.current_device()) if _world.cuda else torch.device("cpu")
    return BoundedLagAllToAll(transport=_world.transport, device=device, **kwargs)


def die() -> None:
    """End this rank as a crash would, with nothing said to its peers: a process exits at once;
    a thread raises RankDied."""
    if _world.threads:
        raise RankDied("this rank died")
    os._exit(3)


# ------------------------------------------------------------------------------------------------
# exactness, shared with the transport-specific tests that read more of the same run


def exact_body(rank, w, bound, iters, seed, channel_kwargs):
    width = 64

    def expected(k):
        return reference(seed, k, rank, w, width)

    with channel(bound=bound, timeout=60, **channel_kwargs) as a2a:
        bad = drive(a2a, rank, w, iters, seed, width, expected, mean_delay_s=0.001)
        return bad, a2a.stats()


def check_exact(world: World, w: int, bound: int, iters: int, seed: int, **channel_kwargs) -> list:
    """Every row of every iteration bit-identical to a synchronous alltoall, under seeded delays
    and windows, variable splits with zeros and empty sends; every iteration counted."""
    results = world.run(w, exact_body, bound, iters, seed, channel_kwargs, timeout_s=240)
    for rank, (bad, stats) in enumerate(results):
        assert bad == [], f"rank {rank}: iterations differ from the synchronous reference: {bad[:10]}"
        assert stats["transport"] == world.transport
        assert stats["posted"] == stats["released"] == stats["arrived"] == iters
        assert 0 <= stats["max_lag"] <= bound + 1
        if world.stream_ordered:  # the device counters count the same
            dev = stats["device"]
            assert (dev["arrived"], dev["released"]) == (iters, iters)
            if w > 1:  # (at W=1 an iteration that moves no bytes takes no device gate)
                assert dev["posted"] == iters
            assert not dev["wait_timed_out"]
            if world.options.get("emulate_streams"):
                assert dev["stream_ops"] == "host_emulation"
    return results


def known_body(rank, w, bound, iters, seed, ask):
    """Every exchange passes recv_splits; `ask[rank]`: whether this rank asks for known_splits."""
    width = 4
    bad = []
    with channel(bound=bound, timeout=30, name="known", known_splits=ask[rank]) as a2a:
        pending = []
        for k in range(iters):
            send, send_splits, recv_splits = send_of(seed, k, rank, w, width)
            pending.append((k, a2a.exchange(send.to(a2a.device), send_splits, recv_splits)))
            if len(pending) > bound:
                k0, h = pending.pop(0)
                recv, splits = h.wait()
                if splits != split_matrix(seed, k0, w)[:, rank].tolist() or not same_bits(
                    recv.cpu(), reference(seed, k0, rank, w, width)
                ):
                    bad.append(k0)
            time.sleep(0.0005 * ((rank + k) % 3))
        for _, h in pending:
            h.wait()
        refused = None
        if a2a._known:
            try:
                a2a.exchange(torch.ones(w, device=a2a.device), [1] * w)  # recv_splits missing
            except ValueError as e:
                refused = str(e)
        return bad, a2a._known, refused, a2a.stats()
