"""Delay models: parsing, determinism, and the statistics each spec promises."""

import time

import numpy as np
import pytest

from blsgpu.bench.delays import DelayModel, sleep_schedule


@pytest.mark.parametrize(
    "spec", ["none", "exp:5", "exp:0.25", "straggler:2:10", "rotate:20", "spikes:0.05:30", "skew:1.2"]
)
def test_round_trip(spec):
    model = DelayModel.parse(spec)
    assert str(model) == spec
    assert DelayModel.parse(str(model)) == model


def test_parse_normalizes():
    assert str(DelayModel.parse(" EXP:5.0 ")) == "exp:5"
    assert DelayModel.parse("exp:5") != DelayModel.parse("exp:6")


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "gauss:3",
        "exp",
        "exp:1:2",
        "exp:abc",
        "exp:-1",
        "exp:nan",
        "straggler:1",
        "straggler:1.5:3",
        "spikes:1.5:3",
        "rotate:inf",
        "none:1",
        "skew:-1",
    ],
)
def test_bad_specs_raise(spec):
    with pytest.raises(ValueError) as e:
        DelayModel.parse(spec)
    assert repr(spec) in str(e.value)
    assert "exp:MEAN_MS" in str(e.value)


def test_schedule_errors():
    with pytest.raises(ValueError, match="straggler rank 4"):
        DelayModel.parse("straggler:4:1").schedule(4, 10)
    with pytest.raises(ValueError, match="base_ms"):
        DelayModel.parse("skew:1").schedule(4, 10)
    with pytest.raises(TypeError):
        DelayModel.parse(5)


@pytest.mark.parametrize("spec", ["exp:5", "spikes:0.3:4", "skew:1"])
def test_deterministic_from_seed(spec):
    m = DelayModel.parse(spec)
    a = m.schedule(8, 50, seed=3, base_ms=2.0)
    b = m.schedule(8, 50, seed=3, base_ms=2.0)
    c = m.schedule(8, 50, seed=4, base_ms=2.0)
    assert a.shape == (8, 50) and a.dtype == np.float64
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_none_is_zero():
    assert not DelayModel.parse("none").schedule(3, 7).any()


def test_exp_mean():
    s = DelayModel.parse("exp:4").schedule(16, 2000, seed=1)
    assert s.min() >= 0
    assert s.mean() == pytest.approx(4e-3, rel=0.03)
    # independent per rank: no rank's mean is far off
    assert np.allclose(s.mean(axis=1), 4e-3, rtol=0.1)


def test_straggler():
    s = DelayModel.parse("straggler:1:10").schedule(4, 6)
    assert np.all(s[1] == 0.01)
    assert not np.delete(s, 1, axis=0).any()


def test_rotate_every_iteration_one_rank():
    W, K = 4, 40
    s = DelayModel.parse("rotate:20").schedule(W, K)
    # exactly one slow rank per iteration: synchronous pays 20 ms every iteration...
    assert np.array_equal((s > 0).sum(axis=0), np.ones(K))
    assert np.all(s.max(axis=0) == 0.02)
    # ...while every rank's own total is K * 20 ms / W
    assert np.allclose(s.sum(axis=1), K * 0.02 / W)
    assert s[3, 7] == 0.02


def test_spikes_rate():
    s = DelayModel.parse("spikes:0.1:30").schedule(32, 1000, seed=2)
    assert set(np.unique(s)) == {0.0, 0.03}
    assert (s > 0).mean() == pytest.approx(0.1, abs=0.01)


def test_skew_persistent_and_zipf():
    m = DelayModel.parse("skew:1")
    s = m.schedule(4, 5, seed=0, base_ms=10.0)
    assert np.all(s == s[:, :1])  # persistent: the same every iteration
    load = m.skew_load(4, seed=0)
    assert load.mean() == pytest.approx(1.0)
    assert sorted(load, reverse=True) == pytest.approx(
        4 / (1 + 1 / 2 + 1 / 3 + 1 / 4) * np.array([1, 1 / 2, 1 / 3, 1 / 4])
    )
    assert np.allclose(s[:, 0], 0.01 * np.clip(load - 1, 0, None))
    assert (s[:, 0] > 0).sum() == 1  # at W = 4, alpha = 1 only the hottest rank is above average
    # alpha 0 is balanced; larger alpha is hotter
    assert not DelayModel.parse("skew:0").schedule(4, 5, base_ms=10.0).any()
    assert DelayModel.parse("skew:2").schedule(4, 5, base_ms=10.0).max() > s.max()


def test_sleep_schedule():
    s = np.array([[0.0, 0.03], [0.01, 0.0]])
    sleep = sleep_schedule(s, 0)
    t = time.perf_counter()
    assert sleep(0) == 0.0
    assert sleep(1) == 0.03
    assert time.perf_counter() - t >= 0.03
    with pytest.raises(ValueError):
        sleep_schedule(s, 2)
