"""DLRM runner: sharded model = unsharded model, bit for bit, at every bound and in sync mode; no
per-iteration synchronisation; the analysis document has the documented schema."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import blsgpu
from blsgpu.bench import sim
from blsgpu.bench.analysis import analyse
from blsgpu.bench.runner import BenchConfig, run_rank
from blsgpu.dlrm import reference_predictions

# Small: T=3 tables of different sizes on W=3 ranks (a rank owns one table each), seeded random
# delays large enough that a fast rank really runs ahead of a slow one.
CFG = BenchConfig(
    world_size=3,
    bounds=(0, 1, 3),
    iterations=6,
    warmup=1,
    batch=8,
    embedding_sizes=(50, 30, 70),
    mlp_bot=(13, 8, 4),
    mlp_top=(8, 1),
    delay="exp:3",
    seed=7,
    pooling=2.0,
    keep_predictions=True,
    timeout_s=60.0,
)


def _with_reference(rank, world_size, cfg):
    out = run_rank(rank, world_size, cfg)
    data = cfg.data()
    batches = [data.batch(rank, k) for k in range(cfg.iterations)]
    out["reference"] = reference_predictions(cfg.arch, cfg.seed, batches)
    return out


@pytest.fixture(scope="module")
def world():
    return blsgpu.run_world(CFG.world_size, _with_reference, CFG, timeout_s=120)


def test_predictions_identical_across_sync_and_every_bound(world):
    labels = CFG.labels()
    assert labels == ["none", "sync", "bls0", "bls1", "bls3"]
    for rank, res in enumerate(world):
        (runs,) = res["repeats"]
        ref = res["reference"]
        assert ref.shape == (CFG.iterations, CFG.batch)
        for label in labels:
            preds = runs[label]["preds"]
            # The sharded model (any bound, blocking or pipelined) is the unsharded one, exactly.
            assert torch.equal(preds, ref), f"rank {rank} {label} differs from the unsharded model"
            assert runs[label]["exact"] is True
        assert len({runs[lb]["digest"] for lb in labels}) == 1
    # Different ranks own different samples: the predictions are not trivially equal.
    assert not torch.equal(world[0]["reference"], world[1]["reference"])


def test_pipeline_runs_ahead_within_the_bound(world):
    for B in CFG.bounds:
        lags = [res["repeats"][0][f"bls{B}"]["max_lag"] for res in world]
        assert all(lag <= B + 1 for lag in lags), (B, lags)
        if B >= 1:
            # Some rank ran ahead of a peer (the slowest rank itself may never have).
            assert max(lags) >= 2, f"bls{B}: no batch ever in flight ahead of a peer: {lags}"
    for res in world:
        assert res["repeats"][0]["sync"]["max_lag"] <= 1


def test_busy_time_includes_the_rank_own_delay(world):
    schedule = np.asarray(world[0]["schedule"])
    assert schedule.shape == (CFG.world_size, CFG.iterations)
    assert np.all(schedule >= 0) and schedule.sum() > 0
    for rank, res in enumerate(world):
        (runs,) = res["repeats"]
        for label in ("sync", "bls3"):
            busy = np.asarray(runs[label]["busy_s"])
            step = np.asarray(runs[label]["step_s"])
            assert busy.shape == (CFG.iterations,)
            assert np.all(busy <= step + 1e-9)
            # time.sleep never sleeps less than asked.
            assert np.all(busy >= schedule[rank] - 1e-4)
        assert np.all(np.asarray(runs["none"]["busy_s"]) < 1.0)


def test_analyse_document(world):
    doc = analyse(CFG, world, flags={"command": "bench", "json": None})
    for key in (
        "config",
        "commit",
        "machine",
        "t_ideal_s",
        "t_none_s",
        "comm_s",
        "base_ms",
        "runs",
        "none_run",
        "exact",
    ):
        assert key in doc
    assert doc["config"]["command"] == "bench"
    assert doc["config"]["bounds"] == CFG.bounds
    assert isinstance(doc["commit"], str) and doc["commit"]
    assert doc["exact"] is True
    runs = doc["runs"]
    assert [(r["mode"], r["bound"]) for r in runs] == [("sync", None), ("bls", 0), ("bls", 1), ("bls", 3)]
    K = CFG.iterations
    for r in runs:
        for key in (
            "throughput_it_s",
            "p50_ms",
            "p99_ms",
            "speedup",
            "exact",
            "simulated_throughput_it_s",
            "predicted_throughput_it_s",
            "samples_per_s",
        ):
            assert isinstance(r[key], (float, bool)), key
        assert "masking" in r
        assert math.isclose(r["throughput_it_s"], K / r["time_s"])
        assert math.isclose(r["samples_per_s"], r["throughput_it_s"] * CFG.batch * CFG.world_size)
        assert r["p50_ms"] <= r["p99_ms"]
        assert np.asarray(r["per_rank_iter_s"]).shape == (CFG.world_size, K)
    assert runs[0]["speedup"] == 1.0
    assert runs[0]["masking"] in (0.0, None)  # None where T_sync <= T_ideal (noise)
    # T_ideal adds the slowest rank's own delays to the run without delays.
    sched = np.asarray(world[0]["schedule"])
    assert math.isclose(doc["t_ideal_s"], doc["t_none_s"] + sched.sum(axis=1).max())
    # The recorded busy times load back into the simulator.
    work = sim.load_work(doc, mode="bls", bound=3)
    assert work.shape == (CFG.world_size, K)


def _count_collectives(rank, world_size, cfgs):
    """Runs each config with every torch.distributed collective counted."""
    import torch.distributed as dist

    from blsgpu.bench import runner

    counts = []
    names = [
        "barrier",
        "all_reduce",
        "all_gather",
        "all_gather_object",
        "all_to_all_single",
        "all_to_all",
        "broadcast",
        "gather",
        "gather_object",
        "reduce",
        "send",
        "recv",
        "isend",
        "irecv",
        "batch_isend_irecv",
    ]
    calls = [0]
    originals = {n: getattr(dist, n) for n in names}

    def wrap(fn):
        def counted(*a, **k):
            calls[0] += 1
            return fn(*a, **k)

        return counted

    for n in names:
        setattr(dist, n, wrap(originals[n]))
    try:
        for cfg in cfgs:
            calls[0] = 0
            out = runner.run_rank(rank, world_size, cfg)
            counts.append((calls[0], out["base_ms"], np.asarray(out["schedule"])))
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
    return counts


def test_no_collective_per_iteration_and_skew_calibration():
    # Collectives outside the engine's channels: a fixed number per run, none per iteration.
    base = dict(
        world_size=2,
        bounds=(2,),
        warmup=0,
        batch=4,
        embedding_sizes=(20, 20),
        mlp_bot=(13, 4),
        mlp_top=(4, 1),
        delay="skew:1.5",
        timeout_s=60.0,
    )
    cfgs = [BenchConfig(iterations=3, **base), BenchConfig(iterations=9, **base)]
    res = blsgpu.run_world(2, _count_collectives, cfgs, timeout_s=120)
    for rank_counts in res:
        (n_short, base_short, _), (n_long, base_long, sched) = rank_counts
        assert n_short == n_long, "a collective count that grows with the iterations"
        assert base_long is not None and base_long > 0
        # skew: a persistent per-rank delay, the same in every iteration, none on the lighter rank.
        assert np.allclose(sched, sched[:, :1])
        assert (sched[:, 0] == 0).sum() >= 1
    # Every rank agreed on the same calibration and schedule.
    assert res[0][1][1] == res[1][1][1]
    assert np.array_equal(res[0][1][2], res[1][1][2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bounds=(1, 1)), "repeat"),
        (dict(bounds=(-1,)), "bounds"),
        (dict(iterations=0), "iterations"),
        (dict(delay="straggler:5:1", world_size=4), "straggler rank 5"),
        (dict(delay="exp"), "exp"),
        (dict(mlp_bot=(12, 16)), "13 dense"),
        (dict(mlp_top=(64, 2)), "must end in 1"),
        (dict(device="tpu"), "device"),
    ],
)
def test_bad_config_is_refused_before_anything_runs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)
