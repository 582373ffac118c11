"""Discrete-event simulator of the synchronous and the BLS schedules (docs/design.md, "Measuring").

Input: ``work[r, k]``, the seconds rank r is busy in iteration k (its compute plus its injected
delay, not the time it spends blocked), and ``comm_s``, the time an exchange takes from the moment
its last rank posts to the moment its data has reached every rank (a scalar or one value per
iteration; ``comm_cost`` turns latency and bytes into one).

Synchronous: every rank starts iteration k together at ``S[k]``; rank r finishes at
``S[k] + c[k] + work[r, k]`` and ``S[k+1]`` is the latest of those, so
``T_sync = sum_k (c[k] + max_r work[r, k])``.

BLS with bound B models the pipelined driver (post k+B, wait k, consume k). Let ``s[r, k]`` be the
time rank r starts step k. In step k the rank first posts iteration k+B (iterations 0..B-1 are
posted at time 0), then waits for iteration k, whose data has reached it once every peer has posted
k, plus the exchange time, then consumes k (``work[r, k]``) and releases it::

    P[p, k]     = 0                                   for k < B
                = s[p, k - B]                         for k >= B    (post time of iteration k)
    s[r, k + 1] = max(s[r, k], max_p P[p, k] + c[k]) + work[r, k]
    T_bls       = max_r s[r, K]

A rank posts k+B in step k, after it released k-1 in step k-1: it posts k only after releasing
k-B-1, and so ``s[r, k+1] >= s[p, k-B] + c >= s[p, k-B]``, the time peer p released k-B-1: no rank
finishes iteration k before every peer has released iteration k-B-1 (docs/design.md, the contract). B = 0
gives the synchronous schedule; B >= K gives ``c[0] + max_r sum_k work[r, k]`` when c is constant.

``T_ideal = T_none + max_r sum_k delay[r, k]``, with T_none the synchronous run of the same work
without injected delays, and masking = (T_sync - T_bls) / (T_sync - T_ideal).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from blsgpu.bench.delays import DelayModel

__all__ = [
    "DEFAULT_COMM_S",
    "Projection",
    "SimResult",
    "comm_cost",
    "fit_comm_s",
    "ideal_time",
    "load_work",
    "masking",
    "project",
    "simulate_bls",
    "simulate_sync",
]

# A small local exchange (gloo on loopback, a few KiB per peer) takes on the order of 100 us.
DEFAULT_COMM_S = 1e-4


@dataclass(frozen=True)
class SimResult:
    """One simulated run: total seconds and ``finish_s[r, k]``, when rank r finished iteration k."""

    total_s: float
    finish_s: np.ndarray

    @property
    def throughput_it_s(self) -> float:
        K = self.finish_s.shape[1]
        return K / self.total_s if self.total_s > 0 else math.inf


@dataclass(frozen=True)
class Projection:
    """Simulated times of one delay model at one bound, and the ratios docs/design.md reports."""

    world_size: int
    iterations: int
    bound: int
    t_none_s: float
    t_ideal_s: float
    t_sync_s: float
    t_bls_s: float

    @property
    def masking(self) -> float:
        return masking(self.t_sync_s, self.t_bls_s, self.t_ideal_s)

    @property
    def speedup(self) -> float:
        return self.t_sync_s / self.t_bls_s

    @property
    def sync_throughput_it_s(self) -> float:
        return self.iterations / self.t_sync_s

    @property
    def bls_throughput_it_s(self) -> float:
        return self.iterations / self.t_bls_s


def comm_cost(nbytes: float, latency_s: float = 20e-6, bytes_per_s: float = 10e9) -> float:
    """Seconds one exchange takes: latency plus the bytes one rank moves over its link."""
    if nbytes < 0 or latency_s < 0 or not bytes_per_s > 0:
        raise ValueError(
            f"need nbytes >= 0, latency_s >= 0, bytes_per_s > 0; got {nbytes}, {latency_s}, {bytes_per_s}"
        )
    return latency_s + nbytes / bytes_per_s


def _work(work) -> np.ndarray:
    w = np.asarray(work, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] < 1:
        raise ValueError(f"work must be [W, iterations] with W >= 1, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("work times must be finite and >= 0")
    return w


def _comm(comm_s, K: int) -> np.ndarray:
    c = np.asarray(comm_s, dtype=np.float64)
    if c.ndim == 0:
        c = np.full(K, float(c))
    if c.shape != (K,):
        raise ValueError(f"comm_s must be a scalar or have one value per iteration ({K}), got {c.shape}")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError("comm_s must be finite and >= 0")
    return c


def simulate_sync(work, comm_s=DEFAULT_COMM_S) -> SimResult:
    """Synchronous schedule: every iteration ends when its slowest rank has finished."""
    w = _work(work)
    W, K = w.shape
    c = _comm(comm_s, K)
    if K == 0:
        return SimResult(0.0, np.zeros((W, 0)))
    ends = np.cumsum(c + w.max(axis=0))  # S[k+1]
    starts = np.concatenate(([0.0], ends[:-1]))
    finish = (starts + c)[None, :] + w
    return SimResult(float(ends[-1]), finish)


def simulate_bls(work, bound: int, comm_s=DEFAULT_COMM_S) -> SimResult:
    """BLS schedule with lag bound B under the pipelined driver (recurrence in the module doc)."""
    w = _work(work)
    if isinstance(bound, bool) or not isinstance(bound, (int, np.integer)) or bound < 0:
        raise ValueError(f"bound must be an integer >= 0, got {bound!r}")
    W, K = w.shape
    c = _comm(comm_s, K)
    B = int(bound)
    wt = np.ascontiguousarray(w.T)  # rows are iterations: one contiguous vector over ranks per step
    finish = np.empty((K, W))
    posted = np.zeros(K)  # max_p P[p, k]; stays 0 for k < B
    s = np.zeros(W)
    for k in range(K):
        if k + B < K:
            posted[k + B] = s.max()
        s = np.maximum(s, posted[k] + c[k])
        s += wt[k]
        finish[k] = s
    total = float(finish[-1].max()) if K else 0.0
    return SimResult(total, finish.T)


def ideal_time(base_work, delay, comm_s=DEFAULT_COMM_S) -> float:
    """T_ideal: the synchronous run of the undelayed work plus the largest per-rank delay sum."""
    d = _work(delay)
    t_none = simulate_sync(base_work, comm_s).total_s
    return t_none + float(d.sum(axis=1).max())


def masking(t_sync: float, t_bls: float, t_ideal: float) -> float:
    """(T_sync - T_bls) / (T_sync - T_ideal); NaN where there was no delay to hide.

    1.0: every delay was hidden except the slowest rank's own; 0.0: BLS hid nothing. NaN when
    T_sync - T_ideal is below a millionth of T_sync (e.g. ``none`` or ``skew``).
    """
    denom = t_sync - t_ideal
    if not denom > 1e-6 * abs(t_sync):
        return math.nan
    return (t_sync - t_bls) / denom


def fit_comm_s(t_none_s: float, base_work) -> float:
    """The constant exchange time that makes a synchronous simulation of base_work last t_none_s."""
    w = _work(base_work)
    K = w.shape[1]
    if K == 0:
        raise ValueError("base_work has no iterations")
    return max(0.0, (t_none_s - float(w.max(axis=0).sum())) / K)


def project(
    delay_model: DelayModel | str,
    world_size: int,
    iterations: int,
    bound: int,
    base_ms: float,
    seed: int = 0,
    comm_s=DEFAULT_COMM_S,
) -> Projection:
    """Simulate a delay model on W ranks that each compute base_ms per iteration.

    Args:
        delay_model: a DelayModel or its spec string.
        base_ms: each rank's compute per iteration, without injected delay (also the base of skew).
    """
    model = DelayModel.parse(delay_model) if isinstance(delay_model, str) else delay_model
    if not base_ms >= 0 or not math.isfinite(base_ms):
        raise ValueError(f"base_ms must be finite and >= 0, got {base_ms}")
    delay = model.schedule(world_size, iterations, seed, base_ms=base_ms)
    base = np.full_like(delay, base_ms / 1e3)
    t_none = simulate_sync(base, comm_s).total_s
    work = base + delay
    return Projection(
        world_size=int(world_size),
        iterations=int(iterations),
        bound=int(bound),
        t_none_s=t_none,
        t_ideal_s=t_none + float(delay.sum(axis=1).max()),
        t_sync_s=simulate_sync(work, comm_s).total_s,
        t_bls_s=simulate_bls(work, bound, comm_s).total_s,
    )


def load_work(source, mode: str | None = None, bound: int | None = None) -> np.ndarray:
    """Per-rank, per-iteration busy seconds [W, iterations] from a ``blsgpu bench --json`` record.

    Args:
        source: a path, or the loaded JSON: a dict with ``per_rank_iter_s``, a dict with ``runs``,
            or a list of runs. Each run's ``per_rank_iter_s`` is a list of W lists of seconds.
        mode, bound: pick the run with this ``mode`` ("sync"/"bls") and ``bound``; by default the
            first run that has ``per_rank_iter_s``.
    """
    data = source
    if isinstance(source, (str, os.PathLike)):
        with open(source) as f:
            data = json.load(f)
    if isinstance(data, dict) and "per_rank_iter_s" in data:
        runs = [data]
    elif isinstance(data, dict) and isinstance(data.get("runs"), list):
        runs = data["runs"]
    elif isinstance(data, list):
        runs = data
    else:
        raise ValueError(f"{source!r}: expected 'per_rank_iter_s' or a list of 'runs'")
    have = [r for r in runs if isinstance(r, dict) and "per_rank_iter_s" in r]
    pick = [
        r
        for r in have
        if (mode is None or r.get("mode") == mode) and (bound is None or r.get("bound") == bound)
    ]
    if not pick:
        found = [(r.get("mode"), r.get("bound")) for r in have]
        raise ValueError(
            f"no run with per_rank_iter_s for mode={mode!r}, bound={bound!r}; runs with it: {found}"
        )
    rows = pick[0]["per_rank_iter_s"]
    if not rows or len({len(row) for row in rows}) != 1:
        raise ValueError("per_rank_iter_s must be W lists of the same length")
    return _work(rows)
