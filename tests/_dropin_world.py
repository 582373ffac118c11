"""Existing code on backend "bls", unchanged: TorchRec's DMP and a reference-DLRM-style loop.

Run as ``python tests/_dropin_world.py OUT_DIR``. This file imports torch and TorchRec only, never
blsgpu: the "bls" backend must come from the package's ``torch.backends`` entry point, as it does
for any script a user already has. tests/test_torchrec_dropin.py runs it and compares.

The process imports torch and TorchRec once (about 10 s on 2 cores), then forks one local world per
(backend, W) in turn: ("bls", 2), ("gloo", 2), ("bls", 3), ("gloo", 3). Every rank of a world:
- builds TorchRec's DistributedModelParallel over an EmbeddingBagCollection, table-wise and
  row-wise (the same seeded weights and batches on both backends), and runs the batches through
  its forward, through EvalPipelineSparseDist, and through TrainPipelineSparseDist in eval mode;
- W=3: the same table-wise model on dist.new_group([0, 1]) (a "bls" subgroup in the "bls" world);
- runs a DLRM inference loop in the style of the reference dlrm_s_pytorch.py: embedding tables
  spread over the ranks, its All2All_Req/All2All_Wait pattern (async all_to_all_single of the
  pooled embeddings of batch k, waited in step k+1 after batch k+1 was posted).
Each rank saves its outputs to OUT_DIR/<backend>-w<W>-r<rank>.pt.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torchrec
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.train_pipeline import EvalPipelineSparseDist, TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv, ShardingPlan

WORLDS = [("bls", 2), ("gloo", 2), ("bls", 3), ("gloo", 3)]
TABLES, ROWS, DIM, BATCH, ITERS = 4, 24, 8, 3, 4
TIMEOUT = timedelta(seconds=60)


# --------------------------------------------------------------------------------------------------
# TorchRec


class _Model(torch.nn.Module):
    """What TorchRec's pipelines drive: model(batch) -> (loss, output)."""

    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc

    def forward(self, batch):
        return batch.dense_features, self.ebc(batch.sparse_features)


def _configs():
    return [
        torchrec.EmbeddingBagConfig(
            name=f"t{i}", num_embeddings=ROWS, embedding_dim=DIM, feature_names=[f"f{i}"]
        )
        for i in range(TABLES)
    ]


def _batches(rank: int) -> list:
    keys = [f"f{i}" for i in range(TABLES)]
    out = []
    for k in range(ITERS):
        g = torch.Generator().manual_seed(1000 * rank + k)
        lengths = torch.randint(0, 4, (TABLES * BATCH,), generator=g)
        values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=g)
        kjt = torchrec.KeyedJaggedTensor.from_lengths_sync(keys, values, lengths)
        out.append(Batch(dense_features=torch.zeros(1), sparse_features=kjt, labels=torch.zeros(1)))
    return out


def _dmp(kind: str, env: ShardingEnv):
    """DMP over TorchRec's EBC: table t on rank t % W (or row blocks), seeded weights."""
    world = env.world_size
    meta = torchrec.EmbeddingBagCollection(tables=_configs(), device=torch.device("meta"))
    sharder = EmbeddingBagCollectionSharder()
    per_param = {
        f"t{i}": row_wise() if kind == "row_wise" else table_wise(rank=i % world) for i in range(TABLES)
    }
    module_plan = construct_module_sharding_plan(
        meta,
        per_param_sharding=per_param,
        local_size=world,
        world_size=world,
        device_type="cpu",
        sharder=sharder,
    )
    dmp = DistributedModelParallel(
        _Model(meta),
        env=env,
        device=torch.device("cpu"),
        plan=ShardingPlan({"ebc": module_plan}),
        sharders=[sharder],
    )
    torch.manual_seed(6)  # the same unsharded tables on every rank and backend
    full = torchrec.EmbeddingBagCollection(tables=_configs(), device=torch.device("cpu"))
    full = {k.split("embedding_bags.")[1]: v for k, v in full.state_dict().items()}
    with torch.no_grad():
        for key, st in dmp.state_dict().items():
            w = full[key.split("embedding_bags.")[1]]
            for sh in st.local_shards():
                (r0, c0), (nr, nc) = sh.metadata.shard_offsets, sh.metadata.shard_sizes
                sh.tensor.copy_(w[r0 : r0 + nr, c0 : c0 + nc])
    dmp.eval()
    return dmp


def _as_dict(kt) -> dict:
    kt = kt.wait() if hasattr(kt, "wait") else kt
    return {k: v.detach().clone() for k, v in kt.to_dict().items()}


def _run_pipeline(pipe) -> list:
    """The pipelines return the model's output (its second item) batch by batch."""
    outs, it = [], iter(_BATCHES)
    with torch.no_grad():
        while True:
            try:
                outs.append(_as_dict(pipe.progress(it)))
            except StopIteration:
                return outs


def _posted(group) -> int | None:
    """Iterations posted on a "bls" group's channels so far (None on any other group)."""
    stats = getattr(group, "channel_stats", None)  # a method of the "bls" group, not imported
    return None if stats is None else sum(s["posted"] for s in stats().values())


def _torchrec_case(kind: str, group) -> dict:
    posted = _posted(group)
    env = ShardingEnv.from_process_group(group)
    dmp = _dmp(kind, env)
    with torch.no_grad():
        forward = [_as_dict(dmp(b)[1]) for b in _BATCHES]
    # Each pipeline rewrites the model it drives: a fresh DMP for each.
    evaluated = _run_pipeline(EvalPipelineSparseDist(_dmp(kind, env), None, torch.device("cpu")))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)  # unused in eval mode
    trained = _run_pipeline(TrainPipelineSparseDist(_dmp(kind, env), opt, torch.device("cpu")))
    return {
        "forward": forward,
        "eval_pipeline": evaluated,
        "train_pipeline": trained,
        "group_name": group.group_name,
        "group_type": type(group).__name__,
        "bls_posted": None if posted is None else _posted(group) - posted,
    }


# --------------------------------------------------------------------------------------------------
# The reference DLRM's model-parallel embeddings: All2All_Req / All2All_Wait


class _Request:
    def __init__(self):
        self.req = None
        self.out = None


class All2All_Req(torch.autograd.Function):  # the reference's name
    """Posts the alltoall of this rank's pooled embeddings (for every rank's samples); no wait."""

    @staticmethod
    def forward(ctx, request, mb_split_lengths, emb_split_lengths, *inputs):
        # inputs: this rank's tables' pooled embeddings for the global batch, [W * N, D] each
        inp = torch.cat(inputs, dim=1)  # [W * N, T_mine * D], rows grouped by owner rank
        send = torch.cat([c.reshape(-1) for c in inp.split(mb_split_lengths)])
        in_splits = [n * inp.shape[1] for n in mb_split_lengths]
        out_splits = [mb_split_lengths[dist.get_rank()] * e for e in emb_split_lengths]
        out = send.new_empty(sum(out_splits))
        request.req = dist.all_to_all_single(out, send, out_splits, in_splits, async_op=True)
        request.out = (out, out_splits)
        return out  # filled by the wait


class All2All_Wait(torch.autograd.Function):  # the reference's name
    @staticmethod
    def forward(ctx, request, local_n, dim):
        request.req.wait()
        out, out_splits = request.out
        request.req = None
        parts = [p.view(local_n, -1) for p in out.split(out_splits)]
        return torch.cat(parts, dim=1)  # [N, T * D] in table order


def _dlrm_loop(rank: int, world: int) -> dict:
    """Batch k posts its embedding alltoall, then waits batch k-1's and runs its top MLP."""
    n, d, iters = 4, 4, 6
    mine = list(range(sum(r + 1 for r in range(rank)), sum(r + 1 for r in range(rank + 1))))
    tables_of = [r + 1 for r in range(world)]  # rank r owns r+1 tables: uneven splits
    t_all = sum(tables_of)
    torch.manual_seed(0)  # the same model on every rank (its tables, its MLPs)
    embs = [torch.nn.EmbeddingBag(16, d, mode="sum") for _ in range(t_all)]
    bot = torch.nn.Sequential(torch.nn.Linear(3, d), torch.nn.ReLU())
    top = torch.nn.Sequential(torch.nn.Linear(d + t_all * d, 1), torch.nn.Sigmoid())

    def global_batch(k):  # the sparse part of the global batch, the same on every rank
        g = torch.Generator().manual_seed(77 + k)
        ids = torch.randint(0, 16, (t_all, world * n, 2), generator=g)
        dense = torch.randn(world * n, 3, generator=g)
        return ids, dense

    def top_of(dense, ly):
        return top(torch.cat([bot(dense), ly], dim=1)).flatten()

    preds, reference, pending = [], [], None
    posted = _posted(dist.group.WORLD)
    with torch.no_grad():
        for k in range(iters + 1):
            if k < iters:
                ids, dense = global_batch(k)
                req = _Request()
                All2All_Req.apply(
                    req,
                    [n] * world,
                    [tables_of[r] * d for r in range(world)],
                    *[embs[t](ids[t]) for t in mine],
                )
                reference.append(
                    top_of(
                        dense[rank * n : (rank + 1) * n],
                        torch.cat([embs[t](ids[t][rank * n : (rank + 1) * n]) for t in range(t_all)], dim=1),
                    )
                )
            if pending is not None:  # waited in the next step, as the BLS paper ran it
                p_req, p_dense = pending
                ly = All2All_Wait.apply(p_req, n, d)
                preds.append(top_of(p_dense, ly))
            pending = (req, dense[rank * n : (rank + 1) * n]) if k < iters else None
    return {
        "preds": preds,
        "reference": reference,
        "bls_posted": None if posted is None else _posted(dist.group.WORLD) - posted,
    }


# --------------------------------------------------------------------------------------------------
# One rank, one world


_BATCHES: list = []


def _rank(rank: int, world: int, backend: str, store_path: str, out_dir: str) -> None:
    global _BATCHES
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT)
        _BATCHES = _batches(rank)
        pg = dist.group.WORLD
        res = {"backend": dist.get_backend(), "group_type": type(pg).__name__}
        for kind in ("table_wise", "row_wise"):
            res[kind] = _torchrec_case(kind, pg)
        if world == 3:
            sub = dist.new_group([0, 1])  # collective over the world; rank 2 is not in it
            if rank < 2:
                res["subgroup"] = _torchrec_case("table_wise", sub)
        res["dlrm"] = _dlrm_loop(rank, world)
        dist.barrier()
        torch.save(res, os.path.join(out_dir, f"{backend}-w{world}-r{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def main(out_dir: str) -> int:
    torch.set_num_threads(1)
    logging.getLogger("torchrec").setLevel(logging.ERROR)  # "Compute Kernel is dense" per table
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # the pipelines' tracing
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecated names
    ctx = mp.get_context("fork")  # torch and TorchRec are imported once, here
    failed = []
    for backend, world in WORLDS:
        store_path = os.path.join(out_dir, f"store-{backend}-w{world}")
        procs = [
            ctx.Process(target=_rank, args=(r, world, backend, store_path, out_dir)) for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
            if p.exitcode != 0:
                failed.append(f"{backend} W={world} rank {r}: exit code {p.exitcode}")
    for f in failed:
        print(f, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    sys.exit(main(sys.argv[1]))
