"""run_world's failure reporting, and the control collectives (barrier, gather) that name a silent rank."""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import blsgpu
from blsgpu import PeerError
from blsgpu import world as _world
from blsgpu.world import RankError, run_world


def _raises_while_peer_exchanges(rank, w):
    a2a = blsgpu.BoundedLagAllToAll(bound=1, name="first-failure")  # the default timeout (300 s)
    a2a.exchange(torch.ones(w), [1] * w).wait()
    if rank == 1:
        raise ValueError("rank one's own mistake")
    a2a.exchange(torch.ones(w), [1] * w).wait()  # never delivered by rank 1
    return rank


def test_the_first_failure_is_raised_with_its_traceback_and_the_others_as_context():
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        run_world(2, _raises_while_peer_exchanges, timeout_s=120)
    elapsed = time.monotonic() - t0
    err = info.value
    assert err.rank == 1 and err.remote_type == "ValueError"
    text = str(err)
    assert text.startswith("rank 1 raised ValueError: rank one's own mistake")
    assert "Traceback" in text and "_raises_while_peer_exchanges" in text
    assert isinstance(err.__cause__, ValueError) and err.__cause__.rank == 1
    # The survivor's verdict is context, naming the failed rank; it came at once, not after a
    # channel timeout or a grace period.
    assert "meanwhile on the other ranks" in text and "rank 0: PeerError" in text
    assert isinstance(err.others[0], RankError) and isinstance(err.others[0].__cause__, PeerError)
    assert err.others[0].__cause__.peer == 1
    assert elapsed < 25, elapsed


def test_default_grace_outlasts_the_default_channel_timeout():
    assert inspect.signature(run_world).parameters["grace_s"].default is None
    assert _world._default_grace_s() > blsgpu._env.default_timeout().total_seconds()


def _silent_in_barrier(rank, w, silent_s):
    if rank == w - 1:
        time.sleep(silent_s)
        return "late"
    t0 = time.monotonic()
    try:
        _world.barrier("between runs", timeout_s=1.5)
    except PeerError as e:
        return e.peer, e.channel, e.iteration, str(e), time.monotonic() - t0
    return "passed"


def test_barrier_names_a_silent_rank_within_its_timeout():
    results = run_world(3, _silent_in_barrier, 4.0, timeout_s=60)
    assert results[2] == "late"
    for r in (0, 1):
        peer, channel, iteration, text, waited = results[r]
        assert peer == 2 and channel == "barrier 'between runs'" and iteration == -1
        assert f"rank {r}: rank 2 did not reach barrier 'between runs' within 1.5 s" in text
        assert 1.4 < waited < 3.5


def _collectives(rank, w):
    _world.barrier("a", timeout_s=30)
    everyone = _world.all_gather_object("who", {"rank": rank}, timeout_s=30)
    at_root = _world.gather_object("result", [rank] * (rank + 1), timeout_s=30, dst=1)
    _world.barrier("b", timeout_s=30)
    return everyone, at_root


def test_gather_and_all_gather():
    results = run_world(3, _collectives, timeout_s=60)
    for r, (everyone, at_root) in enumerate(results):
        assert everyone == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
        assert at_root == ([[0], [1, 1], [2, 2, 2]] if r == 1 else None)


def _dies_before_gather(rank, w, pid_dir):
    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    if rank == 0:
        os._exit(7)
    try:
        _world.all_gather_object("x", rank, timeout_s=1.0)
    except PeerError as e:
        return e.peer
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_a_dead_rank_is_named_first_and_the_survivors_verdicts_follow(tmp_path):
    with pytest.raises(RankError, match="rank 0 died with exit code 7") as info:
        run_world(3, _dies_before_gather, str(tmp_path), timeout_s=60)
    assert "meanwhile on the other ranks" not in str(info.value)  # survivors returned normally
    time.sleep(0.5)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 3
    assert not [p for p in pids if _alive(p)], "run_world left processes behind"


def _fail_on_rank_one(rank, w):
    if rank == 1:
        return 1 / 0
    return rank


def test_run_world_names_failing_rank():
    with pytest.raises(RankError, match="rank 1 raised ZeroDivisionError"):
        run_world(2, _fail_on_rank_one)


def _one_fails_others_block(rank, w):
    if rank == 1:
        raise RuntimeError("boom")
    dist.barrier()  # never completes: rank 1 is gone
    return rank


def test_run_world_fails_fast_after_grace():
    t0 = time.monotonic()
    results = run_world(2, _one_fails_others_block, grace_s=2.0, timeout_s=120, return_exceptions=True)
    assert time.monotonic() - t0 < 20
    assert isinstance(results[1], RuntimeError) and str(results[1]) == "boom"
    assert isinstance(results[0], RankError) and "after another rank failed" in str(results[0])


def _late_between_runs(rank, w, cfg):
    from blsgpu.bench import runner

    original = runner._barrier

    def barrier(name, cfg):
        if rank == 1 and name == "sync:0 end":
            time.sleep(4 * cfg.timeout_s)  # silent outside any exchange, between two runs
        return original(name, cfg)

    runner._barrier = barrier
    t0 = time.monotonic()
    try:
        runner.run_rank(rank, w, cfg)
    except PeerError as e:
        return e.peer, e.channel, time.monotonic() - t0
    return "finished"


def test_the_dlrm_runner_names_a_rank_silent_between_runs():
    from blsgpu.bench.runner import BenchConfig

    cfg = BenchConfig(
        world_size=2,
        bounds=(1,),
        iterations=3,
        warmup=0,
        batch=4,
        embedding_sizes=(20, 20),
        mlp_bot=(13, 4),
        mlp_top=(4, 1),
        delay="none",
        timeout_s=1.5,
    )
    results = run_world(2, _late_between_runs, cfg, timeout_s=60, return_exceptions=True)
    peer, channel, elapsed = results[0]
    assert peer == 1 and channel == "barrier 'sync:0 end'", channel
    assert elapsed < 4 * cfg.timeout_s


def _sleeps(rank, w):
    time.sleep(60)


def test_a_world_out_of_time_names_every_late_rank_once():
    with pytest.raises(RankError) as info:
        run_world(2, _sleeps, timeout_s=3)
    assert str(info.value) == "ranks 0, 1 did not finish within 3 s and were killed"


def _default_store_body(rank, w):
    _world.set_control_store(None)  # as in a process group set up by the user: its own store
    _world.barrier("x", timeout_s=30)
    return _world.all_gather_object("y", rank * 10, timeout_s=30)


def test_control_collectives_fall_back_to_the_default_groups_store():
    assert run_world(2, _default_store_body, timeout_s=60) == [[0, 10], [0, 10]]
