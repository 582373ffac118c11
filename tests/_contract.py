"""Seeded workloads for the exchange-contract tests, shared by every transport's test module."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]


def variants(width: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, trailing dims) cycled over iterations: every dtype, 1-D and 2-D [n, width]."""
    return [(dt, tr) for dt in DTYPES for tr in [(), (width,)]]


def split_matrix(seed: int, k: int, w: int) -> np.ndarray:
    """splits[src, dst] for iteration k: random, many zeros, and now and then a silent sender."""
    g = np.random.default_rng([seed, k])
    m = g.integers(0, 7, size=(w, w))
    m[g.random((w, w)) < 0.3] = 0
    if k % 5 == 2:
        m[k % w, :] = 0  # this rank sends nothing at all
    return m


def payload(seed: int, k: int, src: int, n: int, dtype: torch.dtype, trailing) -> torch.Tensor:
    """What rank `src` sends in iteration k (all destinations, in rank order)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + k * 1009 + src)
    x = torch.randn((n, *trailing), generator=g) * 1000
    return x.to(dtype) if dtype.is_floating_point else x.round().to(dtype)


def send_of(seed: int, k: int, rank: int, w: int, width: int):
    """(send tensor, send_splits, recv_splits) of `rank` in iteration k."""
    dtype, trailing = variants(width)[k % (2 * len(DTYPES))]
    m = split_matrix(seed, k, w)
    return payload(seed, k, rank, int(m[rank].sum()), dtype, trailing), m[rank].tolist(), \
        m[:, rank].tolist()


def reference(seed: int, k: int, rank: int, w: int, width: int) -> torch.Tensor:
    """What a synchronous all_to_all_single delivers to `rank` in iteration k, computed locally."""
    dtype, trailing = variants(width)[k % (2 * len(DTYPES))]
    m = split_matrix(seed, k, w)
    parts = []
    for src in range(w):
        send = payload(seed, k, src, int(m[src].sum()), dtype, trailing)
        lo = int(m[src, :rank].sum())
        parts.append(send[lo : lo + int(m[src, rank])])
    return torch.cat(parts)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def drive(a2a, rank: int, w: int, iters: int, seed: int, width: int,
          expected: Callable[[int], torch.Tensor], mean_delay_s: float) -> list[int]:
    """Run `iters` exchanges with seeded delays, keeping a random 1..B+1 outstanding (half of them
    with known recv_splits); return the iterations whose data differ from expected(k)."""
    rng = np.random.default_rng([seed, rank, 7])
    delays = rng.exponential(mean_delay_s, size=iters) * (rng.random(iters) < 0.4)
    window = rng.integers(1, a2a.bound + 2, size=iters)
    bad: list[int] = []
    pending = []

    def check(k, handle):
        recv, recv_splits = handle.wait()
        if not same_bits(recv, expected(k)) or recv_splits != split_matrix(seed, k, w)[:, rank].tolist():
            bad.append(k)

    for k in range(iters):
        send, send_splits, recv_splits = send_of(seed, k, rank, w, width)
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
    from blsgpu import BoundedLagAllToAll

    finished = []
    with BoundedLagAllToAll(bound=bound, timeout=60) as a2a:
        handles = []
        for k in range(iters + bound):
            if k < iters:
                handles.append(a2a.exchange(torch.full((w,), float(k)), [1] * w))
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
