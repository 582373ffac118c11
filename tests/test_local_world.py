"""The in-process multi-rank mode (blsgpu.transport.local) on CPU: W ranks as threads, the same engine.

What the GPU runs as W stream sets on one device runs here as W threads with host copies; with
emulate_streams the engine takes its stream-ordered path (hand-over through order(), device counters
over host-emulated stream operations), as on a GPU. The contract runs on both modes in
tests/test_contract.py; here, what is the launcher's own.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _contract import WORLDS, check_exact

from blsgpu import BoundedLagAllToAll
from blsgpu.transport.local import current_group, run_local
from blsgpu.world import RankError


def test_exact_with_the_self_part_through_the_fabric():
    # The contract's "local" world copies a rank's own part in the engine, as gloo does; loopback
    # sends it through the fabric (as a GPU must), here on the host path.
    world = dataclasses.replace(WORLDS["local"], options={"loopback": True})
    check_exact(world, 4, 1, iters=120, seed=32)


def _dies_body(rank, w, die_rank):
    a2a = BoundedLagAllToAll(bound=1, timeout=20, name="local-death")
    for k in range(20):
        if rank == die_rank and k == 5:
            raise KeyError("boom")
        a2a.exchange(torch.ones(w), [1] * w).wait()
    a2a.close()


def test_run_local_names_the_rank_that_failed_first():
    # (How fast its peers learn it, and what they say, is the contract's dead-peer case.)
    with pytest.raises(RankError, match="rank 2 raised KeyError"):
        run_local(3, _dies_body, 2, timeout_s=60)


def _group_body(rank, w):
    g = current_group()
    with BoundedLagAllToAll(group=g, bound=0, transport="local") as a2a:
        recv, _ = a2a.exchange(torch.tensor([float(rank)] * w), [1] * w).wait()
    return g.rank(), g.size(), recv.tolist()


def test_explicit_group_and_no_group_outside_a_local_world():
    assert current_group() is None
    assert run_local(2, _group_body) == [(0, 2, [0.0, 1.0]), (1, 2, [0.0, 1.0])]
    with pytest.raises(ValueError, match="needs a group of blsgpu.transport.local.run_local"):
        BoundedLagAllToAll(transport="local")
    with pytest.raises(ValueError, match="emulate_streams is for CPU"):
        run_local(2, _group_body, device="cuda", emulate_streams=True)
