"""Sharded EmbeddingBagCollection on BLS channels (gloo, CPU): exact against the unsharded collection
and TorchRec's sharded forward, lag of a pipelined run, reduced precision, bad input."""

from __future__ import annotations

import importlib
import time

import numpy as np
import pytest
import torch

from blsgpu import run_world
from blsgpu.embedding import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    KeyedJaggedTensor,
    ShardedEmbeddingBagCollection,
    shard,
)

TABLES = [
    EmbeddingBagConfig("t0", 40, 8, ["f0"]),
    EmbeddingBagConfig("t1", 23, 4, ["f1", "f2"], "mean"),
    EmbeddingBagConfig("t2", 5, 6, ["f3", "f0"]),  # f0 in two tables: keys f0@t0, f0@t2
    EmbeddingBagConfig("t3", 3, 3, ["f4"], "mean"),  # fewer rows than ranks at W=4
]
KEYS = ["f4", "f2", "f0", "f3", "f1"]  # not the table order
ROWS = {"f0": 5, "f1": 23, "f2": 23, "f3": 5, "f4": 3}
MIXED = {"t0": "row_wise", "t1": {"table_wise": 2}, "t2": "table_wise", "t3": "row_wise"}


def _batch(rank, k, weighted, n=None, keys=KEYS, rows=ROWS):
    """Rank r's batch k: N in 0..3 by default (so some ranks send an empty batch), empty bags."""
    g = torch.Generator().manual_seed(10_000 * rank + k)
    n = (rank + k) % 4 if n is None else n
    lengths = torch.randint(0, 5, (len(keys) * n,), generator=g)
    if n:
        lengths[0] = 0
    per_key = lengths.view(len(keys), n).sum(1).tolist()
    values = torch.cat(
        [torch.randint(0, rows[f], (c,), generator=g) for f, c in zip(keys, per_key, strict=True)]
    )
    w = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys, values, lengths, weights=w)


def _delays(rank, iters, seed):
    rng = np.random.default_rng([seed, rank])
    return (rng.exponential(0.003, iters) * (rng.random(iters) < 0.5)).tolist()


def _delayed(batches, delays, stamps=None):
    for b, d in zip(batches, delays, strict=True):
        time.sleep(d)
        if stamps is not None:
            stamps.append(time.monotonic())
        yield b


# ---------------------------------------------------------------- exactness


def _exact_body(rank, world, plan, iters, seed, id_dtype=None):
    out = {}
    for weighted in (False, True):
        ebc = EmbeddingBagCollection(TABLES, seed=seed, is_weighted=weighted)
        if weighted:  # the constructor with a seed draws the same tables as the unsharded module
            sebc = ShardedEmbeddingBagCollection(TABLES, plan, bound=2, is_weighted=True, seed=seed)
        else:
            sebc = shard(ebc, plan=plan, bound=2)
        if id_dtype is not None:  # the int64 message a table of >= 2^31 rows would need
            sebc._id_dtype = id_dtype
        batches = [_batch(rank, k, weighted) for k in range(iters)]
        delays = _delays(rank, iters, seed + weighted)
        ref = [ebc(b) for b in batches]
        fwd = []
        for b, d in zip(batches, delays, strict=True):
            time.sleep(d)
            fwd.append(sebc(b))
        pipe = list(sebc.pipeline(_delayed(batches, delays[::-1])))
        sebc.close()
        same_keys = all(
            kt.keys() == ref[0].keys() and kt.length_per_key() == ref[0].length_per_key() for kt in fwd + pipe
        )
        out[weighted] = (
            same_keys,
            [(r.values(), f.values(), p.values()) for r, f, p in zip(ref, fwd, pipe, strict=True)],
        )
    return out


@pytest.mark.parametrize(
    "world, plan",
    [
        (2, "table_wise"),
        (3, "table_wise"),
        (4, "table_wise"),
        (2, "row_wise"),
        (3, "row_wise"),
        (4, "row_wise"),
        (3, MIXED),
    ],
)
def test_sharded_equals_unsharded(world, plan):
    results = run_world(world, _exact_body, plan, 5, 11 * world, timeout_s=120)
    exact = plan == "table_wise"
    for rank, per_rank in enumerate(results):
        for weighted, (same_keys, triples) in per_rank.items():
            assert same_keys, (rank, weighted)
            for k, (ref, fwd, pipe) in enumerate(triples):
                where = f"rank {rank}, batch {k}, weighted={weighted}"
                assert ref.shape == fwd.shape == pipe.shape, where
                # forward and pipeline add row-wise partial sums in the same order: bit for bit.
                assert torch.equal(fwd, pipe), where
                if exact:
                    assert torch.equal(fwd, ref), where
                else:
                    torch.testing.assert_close(fwd, ref, atol=1e-6, rtol=1e-5, msg=where)


def test_int64_id_messages_equal_unsharded():
    """Tables of >= 2^31 rows send ids as int64 (weights as fp64 bits): the same results."""
    results = run_world(3, _exact_body, MIXED, 3, 7, torch.int64, timeout_s=120)
    for rank, per_rank in enumerate(results):
        for weighted, (same_keys, triples) in per_rank.items():
            assert same_keys
            for ref, fwd, pipe in triples:
                assert torch.equal(fwd, pipe), (rank, weighted)
                torch.testing.assert_close(fwd, ref, atol=1e-6, rtol=1e-5)


def _profiled_body(rank, world):
    from torch.profiler import ProfilerActivity, profile

    sebc = ShardedEmbeddingBagCollection(TABLES, "table_wise", bound=1, seed=3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(2):
            sebc(_batch(rank, k, False, n=2))
        sebc.close()  # inside the profile: the last sends complete before it stops
    return sorted({e.name for e in prof.events() if e.name.startswith("blsgpu.")})


def test_profiler_shows_the_lookup_between_the_exchanges():
    for names in run_world(2, _profiled_body):
        for k in (0, 1):
            assert f"blsgpu.lookup[ebc_pooled:{k}]" in names, names
            for what in ("post", "wait", "release"):
                assert f"blsgpu.{what}[ebc_ids:{k}]" in names, names
                assert f"blsgpu.{what}[ebc_pooled:{k}]" in names, names


# ---------------------------------------------------------------- state dict


def _state_body(rank, world):
    a = EmbeddingBagCollection(TABLES, seed=1)
    b = EmbeddingBagCollection(TABLES, seed=2)
    sebc = shard(a, plan=MIXED)
    full = a.state_dict()
    shards = {k: v.clone() for k, v in sebc.state_dict().items()}
    plan = sebc.plan
    held = {s.table: s for s in plan.shards_of(rank)}
    assert sorted(shards) == sorted(f"embedding_bags.{t}.weight" for t in held)
    for t, s in held.items():
        assert torch.equal(
            shards[f"embedding_bags.{t}.weight"], full[f"embedding_bags.{t}.weight"][s.row_start : s.row_end]
        )
    # The unsharded state of another collection: each rank slices its rows.
    sebc.load_state_dict(b.state_dict())
    batch = _batch(rank, 0, False, n=3)
    same_as_b = torch.allclose(sebc(batch).values(), b(batch).values(), atol=1e-6)
    # This rank's own shards load back too.
    sebc.load_state_dict(shards)
    same_as_a = torch.allclose(sebc(batch).values(), a(batch).values(), atol=1e-6)
    errors = []
    for bad, strict in [
        ({**full, "embedding_bags.t0.weight": torch.zeros(7, 8)}, True),
        ({**full, "nonsense": torch.zeros(1)}, True),
    ]:
        try:
            sebc.load_state_dict(bad, strict=strict)
        except (ValueError, RuntimeError) as e:
            errors.append(str(e))
    sebc.close()
    return same_as_b, same_as_a, errors, sorted(held)


def test_state_dict_uses_unsharded_names():
    results = run_world(3, _state_body, timeout_s=120)
    for rank, (same_as_b, same_as_a, errors, held) in enumerate(results):
        assert same_as_b and same_as_a, rank
        assert any("unexpected keys ['nonsense']" in e for e in errors), errors
        if "t0" in held:  # t0 is row-wise: every rank holds a block
            assert any("neither the table's (40, 8)" in e for e in errors), errors


# ---------------------------------------------------------------- lag


def _lag_body(rank, world, bounds, iters, slow_s):
    ebc = EmbeddingBagCollection(TABLES, seed=3)
    out = {}
    for B in bounds:
        sebc = shard(ebc, plan="table_wise", bound=B)
        batches = [_batch(rank, k, False, n=2) for k in range(iters)]
        stamps: list[float] = []
        delays = [slow_s if rank == 0 else 0.0] * iters
        got = list(sebc.pipeline(_delayed(batches, delays, stamps)))
        ok = all(torch.equal(g.values(), ebc(b).values()) for g, b in zip(got, batches, strict=True))
        out[B] = (stamps, sebc.stats(), ok)
        sebc.close()
    return out


def test_pipeline_fast_ranks_run_bound_plus_one_ahead():
    """Rank 0 is slow (80 ms before each batch). Rank r takes batch k+B+1 from its iterator after
    rank 0 took batch k (it cannot be further ahead) and before rank 0 takes batch k+1 (it does
    get B+1 ahead), on both channels; B=0 is lock-step."""
    bounds, iters = (0, 2), 7
    results = run_world(3, _lag_body, bounds, iters, 0.08, timeout_s=120)
    for B in bounds:
        slow = results[0][B][0]
        for rank, res in enumerate(results):
            stamps, stats, ok = res[B]
            assert ok, (rank, B)
            for ch in stats.values():
                assert ch["posted"] == ch["released"] == iters
                assert ch["max_lag"] <= B + 1
            if rank == 0:
                continue
            for k in range(iters - B - 1):
                assert slow[k] < stamps[k + B + 1] < slow[k + 1], (rank, B, k)


# ---------------------------------------------------------------- reduced precision


PREC_TABLES = [EmbeddingBagConfig("t0", 30, 64, ["f0"]), EmbeddingBagConfig("t1", 20, 8, ["f1"], "mean")]
PREC_ROWS = {"f0": 30, "f1": 20}


def _precision_body(rank, world):
    ebc = EmbeddingBagCollection(PREC_TABLES, seed=4, is_weighted=True)
    batches = [_batch(rank, k, True, n=4, keys=["f0", "f1"], rows=PREC_ROWS) for k in range(3)]
    ref = [ebc(b).values() for b in batches]
    out = {}
    for name, kw in [
        ("fp32", {}),
        ("fp16", {"comm_dtype": torch.float16}),
        ("bf16", {"comm_dtype": torch.bfloat16}),
        ("int8", {"dtype": torch.int8}),
    ]:
        sebc = shard(ebc, plan="row_wise", **kw)
        got = [sebc(b).values() for b in batches]
        max_len = max(int(b.lengths().max()) for b in batches)
        out[name] = (
            max(float((g - r).abs().max()) for g, r in zip(got, ref, strict=True)),
            sebc.stats()["pooled"]["bytes_sent"],
            sebc.table_nbytes(),
            max_len,
        )
        if name == "int8":  # its state (fused 8-bit rows, same names) loads back as it was
            state = {k: v.clone() for k, v in sebc.state_dict().items()}
            sebc.load_state_dict(ebc.state_dict())  # float tables are quantized on load
            sebc.load_state_dict(state)
            out["int8_state"] = (
                all(v.dtype == torch.uint8 for v in state.values()),
                all(torch.equal(sebc(b).values(), g) for b, g in zip(batches, got, strict=True)),
            )
        sebc.close()
    return out


def test_comm_dtype_and_int8_tables():
    for rank, res in enumerate(run_world(2, _precision_body, timeout_s=120)):
        err32, bytes32, mem32, max_len = res["fp32"]
        assert err32 < 1e-6
        # Half the bytes on the wire; error of one rounding (per row-wise partial sum).
        assert res["fp16"][1] * 2 == bytes32 and res["bf16"][1] * 2 == bytes32
        assert res["fp16"][0] < 2e-3 and res["bf16"][0] < 1.5e-2, res
        assert res["fp16"][0] < res["bf16"][0]
        # int8 row-wise: D + 8 bytes a row instead of 4 D (D=64: 72 / 256; D=8: 16 / 32).
        block = {0: 15, 1: 10}  # rows per rank (row-wise over 2 ranks)
        assert res["int8"][2] == block[0] * 72 + block[1] * 16
        assert mem32 == block[0] * 256 + block[1] * 32
        # Each id's row is off by at most half a quantization step, (max - min) / 510 per
        # element; init bound 1/sqrt(rows), weights in [0, 1): the sum of a bag of L ids is off
        # by at most L * (2 / sqrt(20)) / 510.
        assert 0 < res["int8"][0] <= max_len * (2 / 20**0.5) / 510, (rank, res["int8"])
        assert res["int8_state"] == (True, True)


# ---------------------------------------------------------------- bad input


class _Loose:
    """A TorchRec-like KJT that does no checking of its own (as TorchRec's does not)."""

    def __init__(self, keys, values, lengths, weights=None, vbe=False):
        self._k, self._v, self._l, self._w, self._vbe = keys, values, lengths, weights, vbe

    def keys(self):
        return self._k

    def values(self):
        return self._v

    def lengths(self):
        return self._l

    def weights_or_none(self):
        return self._w

    def variable_stride_per_key(self):
        return self._vbe


def _bad_input_body(rank, world):
    sebc = ShardedEmbeddingBagCollection(TABLES, "row_wise", bound=1, is_weighted=True, seed=5)
    good = _batch(rank, 0, True, n=2)
    messages = []
    if rank == 0:
        v, n = good.values(), good.lengths()
        w = good.weights()
        bad = [
            KeyedJaggedTensor(
                ["f0", "f1", "f2", "f3"], v[:4], lengths=torch.ones(4, dtype=torch.long), weights=w[:4]
            ),
            KeyedJaggedTensor(KEYS, torch.full_like(v, 23), lengths=n, weights=w),
            KeyedJaggedTensor(KEYS, -torch.ones_like(v), lengths=n, weights=w),
            _Loose(KEYS, v, n + 1, w),
            _Loose(KEYS, v, n, w[:-1]),
            _Loose(KEYS, v, torch.cat([n, n[:1]]), torch.cat([w, w[: n[0]]])),
            _Loose(KEYS, v, n, w, vbe=True),
            KeyedJaggedTensor(KEYS, v, lengths=n),
            {"f0": v},
        ]
        for b in bad:
            try:
                sebc(b)
                messages.append(None)
            except (ValueError, TypeError) as e:
                messages.append(f"{type(e).__name__}: {e}")
        try:
            list(sebc.pipeline([bad[1]]))
            messages.append(None)
        except ValueError as e:
            messages.append(f"{type(e).__name__}: {e}")
    posted = sebc.stats()["ids"]["posted"]
    # Nothing went out, so the channels are still in step: a good batch goes through.
    ok = torch.allclose(
        sebc(good).values(),
        EmbeddingBagCollection(TABLES, seed=5, is_weighted=True)(good).values(),
        atol=1e-6,
    )
    sebc.close()
    return messages, posted, ok


def test_bad_input_fails_before_any_exchange():
    messages, posted, ok = run_world(2, _bad_input_body, timeout_s=120)[0]
    assert posted == 0 and ok
    expected = [
        r"ValueError: KeyedJaggedTensor lacks features \['f4'\]",
        r"ValueError: feature 'f4': id 23 is out of range \[0, 3\)",
        r"ValueError: feature 'f4': id -1 is out of range",
        r"ValueError: KeyedJaggedTensor: lengths sum to \d+ but there are \d+ values",
        r"ValueError: KeyedJaggedTensor: weights has \d+ elements but there are \d+ values",
        r"ValueError: KeyedJaggedTensor: 11 lengths is not a multiple of 5 keys",
        r"ValueError: .*variable batch size per key",
        r"ValueError: the collection is weighted \(is_weighted=True\) but the KeyedJaggedTensor "
        r"has no weights",
        r"TypeError: expected a KeyedJaggedTensor, got dict",
        r"ValueError: feature 'f4': id 23 is out of range",
    ]
    assert len(messages) == len(expected)
    for m, pattern in zip(messages, expected, strict=True):
        assert m is not None and __import__("re").match(pattern, m), (m, pattern)


# ---------------------------------------------------------------- TorchRec


TR_TABLES = [
    EmbeddingBagConfig("t0", 40, 8, ["f0"]),
    EmbeddingBagConfig("t1", 23, 4, ["f1", "f2"], "mean"),
    EmbeddingBagConfig("t2", 5, 12, ["f3", "f0"]),  # FBGEMM needs D % 4 == 0
    EmbeddingBagConfig("t3", 6, 16, ["f4"], "mean"),
]
TR_ROWS = {"f0": 5, "f1": 23, "f2": 23, "f3": 5, "f4": 6}
# TorchRec 1.8 on CPU gets these wrong, so they are left out of the comparison (each checked
# against TorchRec's own unsharded EmbeddingBagCollection, which blsgpu matches bit for bit):
# - row-wise, a feature looked up in two row-wise tables of different sizes (f0@t2 is wrong);
# - row-wise, weighted mean pooling (its table-wise result is sum(w * row) / L, as blsgpu's);
# - a plan mixing table-wise and row-wise tables (the table-wise outputs are wrong).
TR_CASES = [
    ("table_wise", TR_TABLES, (False, True)),
    ("row_wise", [*TR_TABLES[:2], EmbeddingBagConfig("t2", 5, 12, ["f3"]), TR_TABLES[3]], (False,)),
]


def _torchrec_body(rank, world, iters):
    import torch.distributed as dist
    import torchrec
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingPlan

    out = []
    for kind, tables, weightings in TR_CASES:
        keys = [f for t in tables for f in t.feature_names if f != "f0" or t.name == "t0"]
        for weighted in weightings:
            configs = [t.to_torchrec() for t in tables]
            torch.manual_seed(6)  # the same unsharded TorchRec tables on every rank
            unsharded = torchrec.EmbeddingBagCollection(
                tables=configs, is_weighted=weighted, device=torch.device("cpu")
            )
            # Same placement for both: table t on rank t % W, or row blocks.
            plan = {
                t.name: "row_wise" if kind == "row_wise" else {"table_wise": i % world}
                for i, t in enumerate(tables)
            }
            ours = shard(unsharded, plan=plan, bound=2)  # TorchRec's module in, weights included
            meta = torchrec.EmbeddingBagCollection(
                tables=configs, is_weighted=weighted, device=torch.device("meta")
            )
            sharder = EmbeddingBagCollectionSharder()
            per_param = {
                n: row_wise() if e == "row_wise" else table_wise(rank=e["table_wise"])
                for n, e in plan.items()
            }
            tr_plan = ShardingPlan(
                {
                    "": construct_module_sharding_plan(
                        meta,
                        per_param_sharding=per_param,
                        local_size=world,
                        world_size=world,
                        device_type="cpu",
                        sharder=sharder,
                    )
                }
            )
            dmp = DistributedModelParallel(meta, device=torch.device("cpu"), plan=tr_plan, sharders=[sharder])
            full = unsharded.state_dict()
            with torch.no_grad():
                for key, st in dmp.state_dict().items():
                    for sh in st.local_shards():
                        (r0, c0), (nr, nc) = sh.metadata.shard_offsets, sh.metadata.shard_sizes
                        sh.tensor.copy_(full[key][r0 : r0 + nr, c0 : c0 + nc])
            batches = [_batch(rank, k, weighted, n=3, keys=keys, rows=TR_ROWS) for k in range(iters)]
            theirs = []
            for b in batches:
                kt = dmp(b.to_torchrec())
                theirs.append((kt.wait() if hasattr(kt, "wait") else kt).to_dict())
            fwd = [ours(b).to_dict() for b in batches]
            pipe = [kt.to_dict() for kt in ours.pipeline(batches)]
            ours.close()
            dist.barrier()
            out.append((kind, weighted, theirs, fwd, pipe))
    return out


def test_equals_torchrec_sharded_forward():
    try:
        importlib.import_module("torchrec.distributed.model_parallel")
    except Exception as e:  # ImportError, or a broken fbgemm install
        pytest.skip(f"torchrec's distributed stack is not importable: {type(e).__name__}: {e}")
    results = run_world(2, _torchrec_body, 3, timeout_s=180)
    for rank, cases in enumerate(results):
        assert len(cases) == 3
        for kind, weighted, theirs, fwd, pipe in cases:
            for k, (t, f, p) in enumerate(zip(theirs, fwd, pipe, strict=True)):
                # TorchRec orders its output keys by sharding; compare key by key.
                assert sorted(t) == sorted(f), (sorted(t), sorted(f))
                for key in f:
                    where = f"{kind}, rank {rank}, batch {k}, weighted={weighted}, key {key}"
                    assert torch.equal(f[key], p[key]), where
                    # FBGEMM's kernels add in their own order: float tolerance.
                    torch.testing.assert_close(f[key], t[key].detach(), atol=1e-6, rtol=1e-5, msg=where)
