"""Synthetic Criteo-like generator: determinism, layout, ranges, skew, speed."""

import time

import numpy as np
import pytest
import torch

from blsgpu.dlrm import Batch, SyntheticCriteo, ZipfSampler


def make(**kw):
    args = dict(num_embeddings=[1000, 50, 20000], batch_size=64, pooling=[2.0, 0.5, 6.0], seed=3)
    args.update(kw)
    return SyntheticCriteo(**args)


def same(a: Batch, b: Batch) -> bool:
    return (
        a.keys == b.keys
        and torch.equal(a.dense, b.dense)
        and torch.equal(a.lengths, b.lengths)
        and torch.equal(a.values, b.values)
        and ((a.weights is None and b.weights is None) or torch.equal(a.weights, b.weights))
    )


def test_deterministic_from_seed_rank_iteration():
    g = make(weighted=True)
    b = g.batch(rank=1, iteration=5)
    assert same(b, g.batch(1, 5))
    assert same(b, make(weighted=True).batch(1, 5))  # a fresh generator: another process
    assert not same(b, g.batch(0, 5))
    assert not same(b, g.batch(1, 6))
    assert not same(b, make(weighted=True, seed=4).batch(1, 5))


def test_shapes_dtypes_ranges():
    g = make(weighted=True)
    b = g.batch(0, 0)
    T, N = 3, 64
    assert b.keys == ("cat_0", "cat_1", "cat_2")
    assert b.dense.shape == (N, 13) and b.dense.dtype == torch.float32
    assert torch.isfinite(b.dense).all() and (b.dense >= 0).all()
    assert b.lengths.shape == (T * N,) and b.lengths.dtype == torch.int64
    assert (b.lengths >= 0).all()
    assert b.values.dtype == torch.int64 and b.values.shape == (int(b.lengths.sum()),)
    assert b.weights.dtype == torch.float32 and b.weights.shape == b.values.shape
    assert b.batch_size == N
    # key-major: table t's ids are the t-th block, each within that table's rows
    per_table = b.lengths.view(T, N).sum(dim=1).tolist()
    for t, ids in enumerate(torch.split(b.values, per_table)):
        assert ids.min() >= 0 and ids.max() < g.num_embeddings[t]
    assert (b.lengths.view(T, N)[1] == 0).any()  # mean 0.5: empty bags occur
    assert make().batch(0, 0).weights is None


def test_pooling_means_and_fixed():
    g = make(batch_size=4000)
    means = g.batch(0, 0).lengths.view(3, -1).double().mean(dim=1)
    assert means.tolist() == pytest.approx([2.0, 0.5, 6.0], rel=0.08)
    f = make(pooling=[1, 3, 2], pooling_dist="fixed").batch(0, 0)
    assert f.lengths.view(3, -1).unique(dim=1).tolist() == [[1], [3], [2]]


def top_share(alpha, n=10000, samples=200000):
    s = ZipfSampler(n, alpha, np.random.default_rng(0))
    ids = s.sample(np.random.default_rng(1).random(samples))
    assert ids.min() >= 0 and ids.max() < n
    counts = np.sort(np.bincount(ids, minlength=n))[::-1]
    return counts[: n // 100].sum() / samples  # share of the hottest 1% of rows


def test_skew_increases_with_exponent():
    shares = [top_share(a) for a in (0.0, 0.5, 1.0, 1.5)]
    assert shares[0] < 0.02  # uniform: about 1%
    assert all(a < b for a, b in zip(shares, shares[1:], strict=False))
    assert shares[-1] > 0.9


def test_zipf_frequencies_and_scattered_hot_rows():
    n, alpha = 1000, 1.2
    s = ZipfSampler(n, alpha, np.random.default_rng(5))
    ids = s.sample(np.random.default_rng(2).random(400000))
    place = s.popularity_rank(ids)
    p = np.arange(1, n + 1) ** -alpha
    p /= p.sum()
    freq = np.bincount(place, minlength=n) / ids.size
    assert freq[:5] == pytest.approx(p[:5], rel=0.03)
    # popularity_rank inverts the row bijection: every place maps back from its own row
    assert s.popularity_rank(s.sample(np.zeros(1))).tolist() == [0]  # u = 0: the hottest row
    assert np.array_equal(np.sort(s.popularity_rank(np.arange(n))), np.arange(n))


def test_table_rows_permuted_differently_per_table():
    g = make(num_embeddings=[100000, 100000], pooling=[1.0, 1.0], batch_size=8)
    hottest = [sm.sample(np.zeros(1))[0] for sm in g.samplers]
    assert hottest[0] != hottest[1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        make(alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match="pooling"):
        make(pooling=-1.0)
    with pytest.raises(ValueError, match="num_embeddings"):
        make(num_embeddings=[0, 5, 5])
    with pytest.raises(ValueError, match="pooling_dist"):
        make(pooling_dist="normal")
    with pytest.raises(ValueError):
        make().batch(-1, 0)


def test_speed_512_by_26_tables():
    g = SyntheticCriteo([100000] * 26, 512, pooling=4.0, seed=0)
    g.batch(0, 0)  # builds the shared CDF once
    t = time.perf_counter()
    for k in range(10):
        g.batch(0, k)
    per_batch = (time.perf_counter() - t) / 10
    assert per_batch < 0.05, f"{per_batch * 1e3:.1f} ms per batch"
