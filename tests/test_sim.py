"""Discrete-event simulator: hand-checked schedules, the BLS contract, and the projections."""

import json
import math
import time

import numpy as np
import pytest

from blsgpu.bench.delays import DelayModel
from blsgpu.bench.sim import (
    comm_cost,
    fit_comm_s,
    ideal_time,
    load_work,
    masking,
    project,
    simulate_bls,
    simulate_sync,
)


def random_work(W, K, seed=0):
    rng = np.random.default_rng(seed)
    return 1e-3 + rng.exponential(2e-3, size=(W, K))


def test_sync_by_hand():
    work = [[1.0, 3.0], [2.0, 1.0]]
    r = simulate_sync(work, comm_s=0.5)
    assert r.total_s == 6.0  # (max 2 + 0.5) + (max 3 + 0.5)
    assert r.finish_s.tolist() == [[1.5, 6.0], [2.5, 4.0]]
    assert r.throughput_it_s == pytest.approx(2 / 6)


def test_bls_by_hand():
    work = [[1.0, 3.0], [2.0, 1.0]]
    # B = 1: both iterations are posted up front, each rank pays only its own work
    r = simulate_bls(work, 1, comm_s=0.5)
    assert r.total_s == 4.5
    assert r.finish_s.tolist() == [[1.5, 4.5], [2.5, 3.5]]


def test_bls_fast_rank_runs_exactly_b_plus_1_ahead():
    # rank 0 is slow in its first iteration only; rank 1 never works.
    work = np.zeros((2, 4))
    work[0, 0] = 3.0
    fast = {B: simulate_bls(work, B, comm_s=0.0).finish_s[1].tolist() for B in (0, 1, 2)}
    # the fast rank finishes B + 1 iterations (0..B) while rank 0 still consumes iteration 0
    assert fast[0] == [0, 3, 3, 3]
    assert fast[1] == [0, 0, 3, 3]
    assert fast[2] == [0, 0, 0, 3]
    assert simulate_sync(work, comm_s=0.0).finish_s[1].tolist() == fast[0]
    assert simulate_bls(work, 1, comm_s=0.0).finish_s[0].tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("W,K", [(2, 30), (5, 40), (16, 25)])
def test_bound_zero_is_sync(W, K):
    work = random_work(W, K, seed=W)
    comm = np.linspace(1e-4, 5e-4, K)
    s, b = simulate_sync(work, comm), simulate_bls(work, 0, comm)
    assert b.total_s == pytest.approx(s.total_s, rel=1e-12)
    assert np.allclose(b.finish_s, s.finish_s, rtol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_contract_no_rank_finishes_k_before_peers_released_k_minus_b_minus_1(seed):
    rng = np.random.default_rng(seed)
    W, K, B = 6, 60, int(rng.integers(0, 5))
    f = simulate_bls(random_work(W, K, seed), B, comm_s=1e-4).finish_s
    earliest_finish = f[:, B + 1 :].min(axis=0)  # over ranks, for k = B+1 ..
    latest_release = f[:, : K - B - 1].max(axis=0)  # over peers, for k - B - 1
    assert np.all(earliest_finish >= latest_release)


def test_large_bound_tends_to_slowest_rank_total():
    work = random_work(4, 50, seed=7)
    c = 1e-4
    r = simulate_bls(work, 50, comm_s=c)
    assert r.total_s == pytest.approx(c + work.sum(axis=1).max())
    assert simulate_bls(work, 1000, comm_s=c).total_s == pytest.approx(r.total_s)


def test_total_non_increasing_in_bound():
    work = random_work(8, 200, seed=3)
    totals = [simulate_bls(work, B, comm_s=2e-4).total_s for B in range(0, 24)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(totals, totals[1:], strict=False))
    assert totals[-1] < 0.8 * totals[0]


@pytest.mark.parametrize("W", [2, 4, 8])
def test_rotating_straggler_masked_for_bound_at_least_w(W):
    for B in (W, 2 * W):
        p = project("rotate:20", W, 400, B, base_ms=2.0, seed=0)
        assert p.masking == pytest.approx(1.0, abs=0.05)
        assert p.speedup > 1.8
    assert project("rotate:20", W, 400, 0, base_ms=2.0).masking == pytest.approx(0.0, abs=1e-9)


def test_exp_masking_at_b8():
    p = project("exp:5", 4, 500, 8, base_ms=2.0, seed=1)
    assert p.masking >= 0.9
    assert p.t_bls_s < p.t_sync_s


def test_masking_definition():
    assert masking(10.0, 6.0, 2.0) == 0.5
    assert masking(10.0, 10.0, 2.0) == 0.0
    assert masking(10.0, 2.0, 2.0) == 1.0
    assert math.isnan(masking(10.0, 9.0, 10.0))  # nothing to hide


def test_project_none_and_constant_straggler_have_nothing_to_mask():
    for spec in ("none", "straggler:1:5", "skew:1"):
        p = project(spec, 4, 100, 4, base_ms=2.0)
        assert p.t_ideal_s == pytest.approx(p.t_sync_s)
        assert math.isnan(p.masking)
        assert p.t_bls_s <= p.t_sync_s


def test_project_matches_pieces():
    W, K, base_ms = 4, 120, 1.5
    model = DelayModel.parse("exp:3")
    delay = model.schedule(W, K, seed=5)
    base = np.full((W, K), base_ms / 1e3)
    p = project(model, W, K, 2, base_ms, seed=5, comm_s=3e-4)
    assert p.t_none_s == pytest.approx(K * (base_ms / 1e3 + 3e-4))
    assert p.t_ideal_s == pytest.approx(ideal_time(base, delay, 3e-4))
    assert p.t_sync_s == pytest.approx(simulate_sync(base + delay, 3e-4).total_s)
    assert p.t_bls_s == pytest.approx(simulate_bls(base + delay, 2, 3e-4).total_s)
    assert p.bls_throughput_it_s == pytest.approx(K / p.t_bls_s)


def test_w4096_by_1000_is_fast():
    work = random_work(4096, 1000)
    t = time.perf_counter()
    simulate_sync(work)
    r = simulate_bls(work, 8)
    elapsed = time.perf_counter() - t
    assert r.finish_s.shape == (4096, 1000)
    assert elapsed < 2.0, f"{elapsed:.2f} s"


def test_comm_cost_and_fit():
    assert comm_cost(1e6, latency_s=1e-5, bytes_per_s=1e9) == pytest.approx(1e-5 + 1e-3)
    base = random_work(3, 40)
    c = fit_comm_s(simulate_sync(base, 7e-4).total_s, base)
    assert c == pytest.approx(7e-4)
    with pytest.raises(ValueError):
        comm_cost(-1)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bound"):
        simulate_bls(np.ones((2, 3)), -1)
    with pytest.raises(ValueError, match="bound"):
        simulate_bls(np.ones((2, 3)), 1.5)
    with pytest.raises(ValueError, match="shape"):
        simulate_sync(np.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        simulate_sync([[1.0, -1.0]])
    with pytest.raises(ValueError, match="comm_s"):
        simulate_sync(np.ones((2, 3)), comm_s=[1.0, 2.0])


def test_load_work(tmp_path):
    rec = {
        "config": {"world_size": 2},
        "runs": [
            {"mode": "sync", "bound": None, "per_rank_iter_s": [[0.1, 0.2], [0.3, 0.4]]},
            {"mode": "bls", "bound": 4, "per_rank_iter_s": [[0.5, 0.6], [0.7, 0.8]]},
            {"mode": "bls", "bound": 8},
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(rec))
    assert load_work(path).tolist() == [[0.1, 0.2], [0.3, 0.4]]
    assert load_work(str(path), mode="bls", bound=4).tolist() == [[0.5, 0.6], [0.7, 0.8]]
    assert load_work(rec["runs"][1]).shape == (2, 2)
    with pytest.raises(ValueError, match="bound=8"):
        load_work(rec, mode="bls", bound=8)
    with pytest.raises(ValueError, match="same length"):
        load_work({"per_rank_iter_s": [[0.1], [0.1, 0.2]]})
    with pytest.raises(ValueError):
        load_work({"nothing": 1})
