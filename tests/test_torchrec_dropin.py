"""Existing code runs on backend "bls" unchanged, bit-identical to gloo, without importing blsgpu.

tests/_dropin_world.py (torch and TorchRec only) runs TorchRec's DistributedModelParallel over an
EmbeddingBagCollection, table-wise and row-wise at W=2 and W=3, through its forward,
EvalPipelineSparseDist and TrainPipelineSparseDist (eval mode), on a "bls" subgroup, and a DLRM loop in
the reference dlrm_s_pytorch.py's All2All_Req style, in a "bls" world and in a gloo world. One run of
it (about 20 s on 2 cores: TorchRec is imported once) serves every test here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("_dropin_world.py")
MODES = ("forward", "eval_pipeline", "train_pipeline")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    if importlib.util.find_spec("torchrec") is None:
        pytest.skip("TorchRec is not installed")
    out = tmp_path_factory.mktemp("dropin")
    env = dict(os.environ)
    env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)  # torch loads "bls" through the entry point
    p = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=280
    )
    assert p.returncode == 0, p.stderr[-4000:]

    def load(backend, world, rank):
        return torch.load(out / f"{backend}-w{world}-r{rank}.pt", weights_only=False)

    return load


def test_the_worlds_import_neither_blsgpu_nor_a_wrapper():
    src = SCRIPT.read_text()
    assert "import blsgpu" not in src and "from blsgpu" not in src


def _assert_same(bls: list, gloo: list, where: str) -> None:
    assert len(bls) == len(gloo) > 0, where
    for k, (b, g) in enumerate(zip(bls, gloo, strict=True)):
        # TorchRec's sharded KeyedTensor lists keys grouped by owner rank, on both backends.
        assert list(b) == list(g), f"{where}, batch {k}"
        for key in b:
            assert torch.equal(b[key], g[key]), f"{where}, batch {k}, key {key}"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["table_wise", "row_wise"])
def test_torchrec_dmp_on_bls_equals_gloo(worlds, kind, world):
    for rank in range(world):
        bls, gloo = worlds("bls", world, rank), worlds("gloo", world, rank)
        assert bls["backend"] == "bls" and bls["group_type"] == "BLSProcessGroup"
        assert gloo["backend"] == "gloo"
        case = bls[kind]
        assert case["bls_posted"] > 0  # TorchRec's alltoalls ran through the BLS channel
        assert case["group_name"]
        for mode in MODES:
            _assert_same(case[mode], gloo[kind][mode], f"{kind} W={world} rank {rank} {mode}")
            # ... and each pipeline gives what the forward gives
            _assert_same(case[mode], case["forward"], f"{kind} W={world} rank {rank} {mode}")


def test_torchrec_dmp_on_a_bls_subgroup(worlds):
    # W=3 world, dist.new_group([0, 1]): a "bls" group of two that TorchRec shards over.
    for rank in (0, 1):
        bls, gloo = worlds("bls", 3, rank), worlds("gloo", 3, rank)
        case = bls["subgroup"]
        assert case["group_type"] == "BLSProcessGroup" and case["bls_posted"] > 0
        assert case["group_name"] != bls["table_wise"]["group_name"]
        for mode in MODES:
            _assert_same(case[mode], gloo["subgroup"][mode], f"subgroup rank {rank} {mode}")
        # the same tables and batches as the W=2 world's table-wise case
        _assert_same(
            case["forward"], worlds("bls", 2, rank)["table_wise"]["forward"], f"subgroup rank {rank} vs W=2"
        )
    assert "subgroup" not in worlds("bls", 3, 2)


@pytest.mark.parametrize("world", [2, 3])
def test_reference_dlrm_loop_on_bls(worlds, world):
    # All2All_Req posts batch k's async all_to_all_single (uneven splits: rank r owns r+1 tables);
    # All2All_Wait waits for it in step k+1.
    for rank in range(world):
        bls, gloo = worlds("bls", world, rank)["dlrm"], worlds("gloo", world, rank)["dlrm"]
        assert bls["bls_posted"] == len(bls["preds"]) == 6 and gloo["bls_posted"] is None
        for k, (b, g, ref) in enumerate(zip(bls["preds"], gloo["preds"], bls["reference"], strict=True)):
            assert torch.equal(b, g), f"W={world} rank {rank} batch {k}"
            assert torch.equal(b, ref), f"W={world} rank {rank} batch {k}: not the local model's"
