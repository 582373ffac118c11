"""Synthetic Criteo-like batches: 13 dense features, T sparse features with Zipf-skewed ids.

Every batch is a pure function of (seed, rank, iteration), so any rank can make any batch and a
synchronous run and a BLS run see the same inputs. Vectorized: one numpy call per table, none per
sample.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Batch", "SyntheticCriteo", "ZipfSampler"]

_MAX_ROWS = 2**31  # keeps a * i + b of the row permutation inside int64


@dataclass(frozen=True)
class Batch:
    """One local batch of N samples; the sparse part is laid out like a TorchRec KJT.

    Attributes:
        dense: [N, 13] float32.
        keys: the T feature names.
        lengths: [T * N] int64, key-major: lengths[t * N + i] ids of sample i in feature t.
        values: [sum(lengths)] int64 row ids, key-major, in sample order within a key.
        weights: [sum(lengths)] float32 per-id weights, or None.
    """

    dense: torch.Tensor
    keys: tuple[str, ...]
    lengths: torch.Tensor
    values: torch.Tensor
    weights: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]


@functools.lru_cache(maxsize=16)
def _zipf_cdf(n: int, alpha: float) -> np.ndarray:
    # Shared by every table with the same (n, alpha); float64 so the tail of 1e6 rows keeps its mass.
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -alpha)
    cdf.flags.writeable = False
    return cdf


class ZipfSampler:
    """Row ids over [0, n) with P(the i-th most popular row) proportional to (i + 1) ** -alpha.

    Inverse CDF by binary search over precomputed cumulative weights; the popularity order is
    scattered over the rows by a seeded bijection i -> (a * i + b) mod n, so the hot rows are not
    rows 0, 1, 2, ... and each table's hot rows differ. alpha = 0 is uniform.
    """

    def __init__(self, n: int, alpha: float, rng: np.random.Generator):
        if not 1 <= n <= _MAX_ROWS:
            raise ValueError(f"num_embeddings must be in [1, 2**31], got {n}")
        if not alpha >= 0 or not math.isfinite(alpha):
            raise ValueError(f"Zipf exponent must be finite and >= 0, got {alpha}")
        self.n, self.alpha = int(n), float(alpha)
        self._cdf = _zipf_cdf(self.n, self.alpha) if self.alpha > 0 else None
        a = 1
        if n > 1:
            a = int(rng.integers(1, n))
            while math.gcd(a, n) != 1:
                a = int(rng.integers(1, n))
        self._a, self._b = a, int(rng.integers(0, n))

    def popularity_rank(self, ids: np.ndarray) -> np.ndarray:
        """The popularity place (0 = hottest) of each row id; inverse of the row bijection."""
        a_inv = pow(self._a, -1, self.n) if self.n > 1 else 0
        return (np.asarray(ids, dtype=np.int64) - self._b) % self.n * a_inv % self.n

    def sample(self, u: np.ndarray) -> np.ndarray:
        """Map uniforms in [0, 1) to row ids (int64)."""
        if self._cdf is None:
            place = (u * self.n).astype(np.int64)
        else:
            place = np.searchsorted(self._cdf, u * self._cdf[-1], side="right")
        np.minimum(place, self.n - 1, out=place)  # u * total may round up to total
        return (place * self._a + self._b) % self.n


def _per_table(value, T: int, name: str) -> np.ndarray:
    v = np.asarray(value, dtype=np.float64)
    if v.ndim == 0:
        v = np.full(T, float(v))
    if v.shape != (T,):
        raise ValueError(f"{name} must be a scalar or one value per table ({T}), got {v.shape}")
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {v.tolist()}")
    return v


class SyntheticCriteo:
    """Criteo-like batch generator, deterministic from (seed, rank, iteration).

    Args:
        num_embeddings: rows of each of the T tables; ids of table t lie in [0, num_embeddings[t]).
        batch_size: N, samples per rank per iteration.
        alpha: Zipf exponent of the ids, one for all tables or one per table (0 = uniform).
        pooling: mean ids per sample (L), one for all tables or one per table.
        pooling_dist: "poisson" (lengths ~ Poisson(L), 0 gives an empty bag) or "fixed"
            (every sample has round(L) ids).
        num_dense: dense features (13 in Criteo). They follow the reference DLRM's preprocessing of
            Criteo's counts: log(1 + x) of a log-normal x, with per-feature scale.
        weighted: also draw per-id weights in [0, 1).
        keys: feature names; "cat_0", "cat_1", ... by default.
    """

    def __init__(
        self,
        num_embeddings: Sequence[int],
        batch_size: int,
        *,
        alpha: float | Sequence[float] = 1.05,
        pooling: float | Sequence[float] = 1.0,
        pooling_dist: str = "poisson",
        num_dense: int = 13,
        weighted: bool = False,
        seed: int = 0,
        keys: Sequence[str] | None = None,
    ):
        rows = [int(n) for n in num_embeddings]
        T = len(rows)
        if T == 0:
            raise ValueError("need at least one table")
        if batch_size < 1 or num_dense < 0:
            raise ValueError(f"need batch_size >= 1 and num_dense >= 0, got {batch_size}, {num_dense}")
        if pooling_dist not in ("poisson", "fixed"):
            raise ValueError(f"pooling_dist must be 'poisson' or 'fixed', got {pooling_dist!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.keys = tuple(keys) if keys is not None else tuple(f"cat_{t}" for t in range(T))
        if len(self.keys) != T or len(set(self.keys)) != T:
            raise ValueError(f"need {T} distinct keys, got {self.keys}")
        self.num_embeddings = tuple(rows)
        self.batch_size, self.num_dense, self.weighted = int(batch_size), int(num_dense), weighted
        self.seed, self.pooling_dist = int(seed), pooling_dist
        self.alpha = _per_table(alpha, T, "alpha")
        self.pooling = _per_table(pooling, T, "pooling")
        # Table-level randomness depends on the seed only: every rank sees the same tables.
        rng = np.random.default_rng([self.seed])
        self.samplers = tuple(ZipfSampler(n, a, rng) for n, a in zip(rows, self.alpha, strict=True))
        self._dense_mu = rng.uniform(0.0, 4.0, num_dense).astype(np.float32)
        self._dense_sigma = rng.uniform(0.5, 1.5, num_dense).astype(np.float32)

    def batch(self, rank: int, iteration: int) -> Batch:
        """The N samples that rank owns in iteration k."""
        if rank < 0 or iteration < 0:
            raise ValueError(f"rank and iteration must be >= 0, got {rank}, {iteration}")
        rng = np.random.default_rng([self.seed, int(rank), int(iteration)])
        N, T = self.batch_size, len(self.samplers)
        z = rng.standard_normal((N, self.num_dense), dtype=np.float32)
        dense = np.log1p(np.exp(z * self._dense_sigma + self._dense_mu))
        if self.pooling_dist == "fixed":
            lengths = np.repeat(np.rint(self.pooling).astype(np.int64), N).reshape(T, N)
        else:
            lengths = rng.poisson(self.pooling[:, None], size=(T, N)).astype(np.int64)
        counts = lengths.sum(axis=1)
        u = rng.random(int(counts.sum()))
        values = np.empty(u.shape[0], dtype=np.int64)
        ends = np.cumsum(counts)
        for t, sampler in enumerate(self.samplers):
            lo, hi = ends[t] - counts[t], ends[t]
            values[lo:hi] = sampler.sample(u[lo:hi])
        weights = None
        if self.weighted:
            weights = torch.from_numpy(rng.random(values.shape[0], dtype=np.float32))
        return Batch(
            dense=torch.from_numpy(dense),
            keys=self.keys,
            lengths=torch.from_numpy(lengths.reshape(-1)),
            values=torch.from_numpy(values),
            weights=weights,
        )
