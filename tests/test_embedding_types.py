"""KeyedJaggedTensor / KeyedTensor / EmbeddingBagConfig / plans / unsharded EBC, and TorchRec interop."""

from __future__ import annotations

import importlib

import pytest
import torch

from blsgpu.embedding import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    KeyedJaggedTensor,
    KeyedTensor,
    make_plan,
)
from blsgpu.embedding._jagged import as_kjt, as_kt


def _torchrec():
    try:
        return importlib.import_module("torchrec")
    except Exception as e:  # ImportError, or a broken fbgemm install
        pytest.skip(f"torchrec is not importable: {type(e).__name__}: {e}")


def _kjt(weighted=False):
    # keys a, b; N = 3; bag a1 and b0 empty.
    values = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    lengths = torch.tensor([2, 0, 1, 0, 3, 1])
    w = torch.arange(7, dtype=torch.float32) / 10 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(["a", "b"], values, lengths, weights=w)


def _random_kjt(keys, rows, n, max_len, weighted, gen):
    lengths = torch.randint(0, max_len + 1, (len(keys) * n,), generator=gen)
    lengths[0] = 0  # always one empty bag
    per_key = lengths.view(len(keys), n).sum(1).tolist()
    values = torch.cat(
        [torch.randint(0, rows[k], (c,), generator=gen) for k, c in zip(keys, per_key, strict=True)]
    )
    w = torch.rand(values.numel(), generator=gen) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys, values, lengths, weights=w)


# ---------------------------------------------------------------- KeyedJaggedTensor


def test_kjt_accessors():
    kjt = _kjt(weighted=True)
    assert kjt.keys() == ["a", "b"]
    assert kjt.stride() == 3
    assert kjt.length_per_key() == [3, 4]
    assert kjt.offset_per_key() == [0, 3, 7]
    assert kjt.offsets().tolist() == [0, 2, 2, 3, 3, 6, 7]
    assert kjt.weights_or_none() is kjt.weights()
    d = kjt.to_dict()
    assert list(d) == ["a", "b"]
    assert d["b"].values().tolist() == [4, 5, 6, 7]
    assert d["b"].lengths().tolist() == [0, 3, 1]
    assert d["b"].offsets().tolist() == [0, 0, 3, 4]
    assert torch.equal(d["b"].weights(), kjt.weights()[3:])
    assert [x.tolist() for x in kjt["a"].to_dense()] == [[1, 2], [], [3]]
    with pytest.raises(KeyError, match="'c' is not a key"):
        kjt["c"]
    assert _kjt().weights_or_none() is None
    with pytest.raises(ValueError, match="no weights"):
        _kjt().weights()


def test_kjt_from_offsets_equals_from_lengths():
    a = _kjt(weighted=True)
    b = KeyedJaggedTensor.from_offsets_sync(["a", "b"], a.values(), a.offsets(), a.weights())
    assert torch.equal(a.lengths(), b.lengths())
    assert b.length_per_key() == a.length_per_key()
    c = KeyedJaggedTensor(["a", "b"], a.values(), lengths=a.lengths(), offsets=a.offsets())
    assert c.stride() == 3
    rebuilt = KeyedJaggedTensor.from_jt_dict(a.to_dict())
    assert torch.equal(rebuilt.values(), a.values()) and torch.equal(rebuilt.weights(), a.weights())


def test_kjt_empty():
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["a"], torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    )
    assert kjt.stride() == 0 and kjt.length_per_key() == [0]
    kjt = KeyedJaggedTensor(
        [], torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(0, dtype=torch.int64), stride=4
    )
    assert kjt.stride() == 4 and kjt.to_dict() == {}


V = torch.tensor([1, 2, 3])


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(lengths=torch.tensor([2, -1, 2])), ValueError, "non-negative"),
        (dict(lengths=torch.tensor([1, 1])), ValueError, "sum to 2 but there are 3"),
        (dict(offsets=torch.tensor([1, 2, 3])), ValueError, "start at 0"),
        (dict(offsets=torch.tensor([0, 2, 1, 3])), ValueError, "non-decreasing"),
        (dict(offsets=torch.tensor([0, 2])), ValueError, "end at 2 but there are 3"),
        (dict(offsets=torch.tensor([], dtype=torch.int64)), ValueError, "at least one"),
        (dict(lengths=torch.tensor([1, 2]), offsets=torch.tensor([0, 2, 3])), ValueError, "running sum"),
        (dict(lengths=torch.tensor([1, 2]), weights=torch.ones(2)), ValueError, "weights has 2 elements"),
        (
            dict(lengths=torch.tensor([1, 2]), weights=torch.ones(3, dtype=torch.int64)),
            TypeError,
            "floating-point",
        ),
        (dict(lengths=torch.tensor([1, 1, 1])), ValueError, "not a multiple of 2 keys"),
        (dict(lengths=torch.tensor([1, 2]), stride=2), ValueError, "stride=2"),
        (dict(), ValueError, "needs lengths or offsets"),
        (dict(lengths=torch.tensor([1.0, 2.0])), TypeError, "integer"),
    ],
)
def test_kjt_validation(kwargs, err, match):
    with pytest.raises(err, match=match):
        KeyedJaggedTensor(["a", "b"], V, **kwargs)


def test_kjt_validation_keys_and_values():
    with pytest.raises(ValueError, match="duplicate keys"):
        KeyedJaggedTensor(["a", "a"], V, lengths=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer"):
        KeyedJaggedTensor(["a"], V.float(), lengths=torch.tensor([3]))
    with pytest.raises(ValueError, match="1-D"):
        KeyedJaggedTensor(["a"], V.view(3, 1), lengths=torch.tensor([3]))
    with pytest.raises(TypeError, match="list of strings"):
        KeyedJaggedTensor("ab", V, lengths=torch.tensor([1, 2]))


# ---------------------------------------------------------------- KeyedTensor


def test_kt_accessors():
    values = torch.arange(12.0).view(2, 6)
    kt = KeyedTensor(["x", "y"], [2, 4], values)
    assert kt.keys() == ["x", "y"] and kt.length_per_key() == [2, 4]
    assert kt.offset_per_key() == [0, 2, 6]
    assert torch.equal(kt["y"], values[:, 2:])
    d = kt.to_dict()
    assert list(d) == ["x", "y"] and torch.equal(d["x"], values[:, :2])
    kt0 = KeyedTensor(["x", "y"], [1, 1], values, key_dim=0)
    assert torch.equal(kt0["y"], values[1:])
    kt2 = KeyedTensor.from_tensor_list(["x", "y"], [values[:, :2], values[:, 2:]])
    assert torch.equal(kt2.values(), values)


def test_kt_validation():
    values = torch.zeros(2, 6)
    with pytest.raises(ValueError, match="length_per_key sums to 5"):
        KeyedTensor(["x", "y"], [2, 3], values)
    with pytest.raises(ValueError, match="2 keys but 1 lengths"):
        KeyedTensor(["x", "y"], [6], values)
    with pytest.raises(ValueError, match="key_dim=2"):
        KeyedTensor(["x"], [6], values, key_dim=2)


# ---------------------------------------------------------------- EmbeddingBagConfig


def test_config_validation():
    c = EmbeddingBagConfig("t", 10, 4, [], pooling="MEAN")
    assert c.feature_names == ["t"] and c.pooling == "mean"
    for kwargs, match in [
        (dict(num_embeddings=0), "num_embeddings"),
        (dict(embedding_dim=-1), "embedding_dim"),
        (dict(pooling="max"), "pooling"),
        (dict(feature_names=["f", "f"]), "duplicate"),
        (dict(feature_names="f"), "list of strings"),
        (dict(name=""), "name"),
    ]:
        args = dict(name="t", num_embeddings=10, embedding_dim=4, feature_names=["f"]) | kwargs
        with pytest.raises(ValueError, match=match):
            EmbeddingBagConfig(**args)


def test_config_from_torchrec():
    tr = _torchrec()
    from torchrec.modules.embedding_configs import PoolingType

    c = EmbeddingBagConfig.from_any(
        tr.EmbeddingBagConfig(
            name="t", num_embeddings=5, embedding_dim=8, feature_names=["f", "g"], pooling=PoolingType.MEAN
        )
    )
    assert c == EmbeddingBagConfig("t", 5, 8, ["f", "g"], "mean")
    for ours in (c, EmbeddingBagConfig("u", 3, 4)):  # and back, mean and sum
        back = ours.to_torchrec()
        assert isinstance(back, tr.EmbeddingBagConfig)
        assert back.pooling == (PoolingType.MEAN if ours.pooling == "mean" else PoolingType.SUM)
        assert EmbeddingBagConfig.from_any(back) == ours
    with pytest.raises(ValueError, match="pooling"):
        EmbeddingBagConfig.from_any(
            tr.EmbeddingBagConfig(
                name="t", num_embeddings=5, embedding_dim=8, feature_names=["f"], pooling=PoolingType.NONE
            )
        )
    with pytest.raises(TypeError, match="expected an EmbeddingBagConfig"):
        EmbeddingBagConfig.from_any(object())


# ---------------------------------------------------------------- plans


TABLES = [
    EmbeddingBagConfig("t0", 100, 8, ["f0"]),
    EmbeddingBagConfig("t1", 50, 8, ["f1", "f2"], "mean"),
    EmbeddingBagConfig("t2", 30, 4, ["f3"]),
    EmbeddingBagConfig("t3", 3, 16, ["f0"]),  # f0 shared with t0 -> keys f0@t0, f0@t3
]


def test_plan_table_wise_greedy():
    p = make_plan(TABLES, "table_wise", 2)
    # costs t0 800, t1 400, t3 48, t2 120: t0 -> 0, t1 -> 1, t2 -> 1, t3 -> 1.
    assert {s.table: s.rank for s in p.shards} == {"t0": 0, "t1": 1, "t2": 1, "t3": 1}
    assert all(
        (s.row_start, s.row_end) == (0, t.num_embeddings) for s, t in zip(p.shards, TABLES, strict=True)
    )
    assert p == make_plan(TABLES, "table_wise", 2)  # deterministic
    assert [s.name for s in p.slots] == ["f0@t0", "f1", "f2", "f3", "f0@t3"]
    assert [s.col for s in p.slots] == [0, 8, 16, 24, 28]
    # Rank 1: sum lookups (f3, f0@t3) before mean lookups (f1, f2); columns follow that order.
    assert [(ls.slot, ls.pooling, ls.col) for ls in p.local[1]] == [
        (3, "sum", 0),
        (4, "sum", 4),
        (1, "mean", 20),
        (2, "mean", 28),
    ]
    assert p.local_dim(0) == 8 and p.local_dim(1) == 36
    # More ranks than tables: some ranks get nothing, which is allowed.
    p8 = make_plan(TABLES, "table_wise", 8)
    assert sorted(s.rank for s in p8.shards) == [0, 1, 2, 3] and p8.local[7] == ()


def test_plan_row_wise_blocks():
    p = make_plan(TABLES, "row_wise", 4)
    t3 = [(s.rank, s.row_start, s.row_end) for s in p.shards if s.table == "t3"]
    assert t3 == [(0, 0, 1), (1, 1, 2), (2, 2, 3)]  # ceil(3/4) = 1; rank 3 holds none
    t0 = [(s.rank, s.row_start, s.row_end) for s in p.shards if s.table == "t0"]
    assert t0 == [(0, 0, 25), (1, 25, 50), (2, 50, 75), (3, 75, 100)]
    for t in TABLES:  # blocks tile the table exactly
        rows = [(s.row_start, s.row_end) for s in p.shards if s.table == t.name]
        assert rows[0][0] == 0 and rows[-1][1] == t.num_embeddings
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
    assert all(ls.pooling == "sum" for loc in p.local for ls in loc)  # partial sums
    assert [r for r, _ in p.owners(4)] == [0, 1, 2]


def test_plan_dict():
    p = make_plan(
        TABLES, {"t0": "row_wise", "t1": {"table_wise": 2}, "t2": "table_wise", "t3": {"table_wise": 0}}, 3
    )
    assert p.kinds == {"t0": "row_wise", "t1": "table_wise", "t2": "table_wise", "t3": "table_wise"}
    owner = {s.table: s.rank for s in p.shards if s.table != "t0"}
    # loads before greedy: r0 = 34*8 + 48 = 320, r1 = 272, r2 = 264 + 400 -> t2 goes to r1.
    assert owner == {"t1": 2, "t2": 1, "t3": 0}


@pytest.mark.parametrize(
    "plan, match",
    [
        (
            {"t0": "row_wise", "t1": "row_wise", "t2": "row_wise", "t3": "row_wise", "tx": "row_wise"},
            "unknown tables",
        ),
        ({"t0": "row_wise"}, "no entry for tables"),
        ({"t0": {"table_wise": 2}, "t1": "row_wise", "t2": "row_wise", "t3": "row_wise"}, "out of range"),
        ({"t0": "column_wise", "t1": "row_wise", "t2": "row_wise", "t3": "row_wise"}, "unknown kind"),
        ("column_wise", "one of"),
    ],
)
def test_plan_validation(plan, match):
    with pytest.raises(ValueError, match=match):
        make_plan(TABLES, plan, 2)


# ---------------------------------------------------------------- unsharded collection


def _reference(ebc, kjt, weighted):
    """Per (table, feature) embedding_bag in float64, the plain reference."""
    d = kjt.to_dict()
    cols = []
    for t in ebc.embedding_bag_configs():
        w = ebc.embedding_bags[t.name].weight.double()
        for f in t.feature_names:
            jt = d[f]
            pw = jt.weights().double() if weighted else None
            res = torch.nn.functional.embedding_bag(
                jt.values(), w, jt.offsets(), mode="sum", per_sample_weights=pw, include_last_offset=True
            )
            if t.pooling == "mean":
                res = res / jt.lengths().clamp(min=1).unsqueeze(1)
            cols.append(res)
    return torch.cat(cols, 1)


@pytest.mark.parametrize("weighted", [False, True])
def test_ebc_matches_reference(weighted):
    gen = torch.Generator().manual_seed(0)
    ebc = EmbeddingBagCollection(TABLES, seed=1, is_weighted=weighted)
    rows = {"f0": 3, "f1": 50, "f2": 50, "f3": 30, "extra": 5}
    kjt = _random_kjt(["f3", "extra", "f2", "f0", "f1"], rows, 6, 5, weighted, gen)
    kt = ebc(kjt)
    assert kt.keys() == ["f0@t0", "f1", "f2", "f3", "f0@t3"]
    assert kt.length_per_key() == [8, 8, 8, 4, 16]
    assert kt.values().dtype == torch.float32
    torch.testing.assert_close(kt.values().double(), _reference(ebc, kjt, weighted), atol=1e-6, rtol=1e-6)
    assert kt.values()[0, 24:28].abs().sum() == 0  # f3 is first key: bag 0 is empty


def test_ebc_takes_ids_of_any_integer_type():
    # As the sharded collection does: int16/uint8 ids look up the same rows as int64 ones.
    gen = torch.Generator().manual_seed(4)
    ebc = EmbeddingBagCollection(TABLES, seed=1)
    rows = {"f0": 3, "f1": 50, "f2": 50, "f3": 30}
    kjt = _random_kjt(["f0", "f1", "f2", "f3"], rows, 6, 5, False, gen)
    want = ebc(kjt).values()
    for dtype in (torch.int16, torch.uint8, torch.int32):
        narrow = KeyedJaggedTensor(kjt.keys(), kjt.values().to(dtype), lengths=kjt.lengths())
        assert torch.equal(ebc(narrow).values(), want), dtype
    bad = KeyedJaggedTensor(kjt.keys(), kjt.values().to(torch.int16) - 100, lengths=kjt.lengths())
    with pytest.raises(ValueError):
        ebc(bad)


def test_ebc_seeded_init_and_state_dict_names():
    a = EmbeddingBagCollection(TABLES, seed=3)
    b = EmbeddingBagCollection(TABLES, seed=3)
    c = EmbeddingBagCollection(TABLES, seed=4)
    assert list(a.state_dict()) == [f"embedding_bags.{t.name}.weight" for t in TABLES]
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(
        a.state_dict()["embedding_bags.t0.weight"], c.state_dict()["embedding_bags.t0.weight"]
    )
    w = a.state_dict()["embedding_bags.t1.weight"]
    assert w.shape == (50, 8) and w.abs().max() <= (1 / 50) ** 0.5


def test_ebc_bad_input():
    ebc = EmbeddingBagCollection(TABLES, seed=0, is_weighted=True)
    lengths = torch.tensor([1, 1, 1, 1])

    def kjt(values, keys=("f0", "f1", "f2", "f3"), weights=True):
        v = torch.tensor(values)
        return KeyedJaggedTensor.from_lengths_sync(
            list(keys), v, lengths, weights=torch.ones(len(values)) if weights else None
        )

    with pytest.raises(ValueError, match=r"lacks features \['f3'\]"):
        ebc(
            KeyedJaggedTensor.from_lengths_sync(
                ["f0", "f1", "f2"], torch.tensor([0, 0, 0]), torch.tensor([1, 1, 1])
            )
        )
    # f0 is looked up in t3 (3 rows) too, so its limit is 3.
    with pytest.raises(ValueError, match=r"feature 'f0': id 3 is out of range \[0, 3\)"):
        ebc(kjt([3, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"feature 'f3': id -1 is out of range"):
        ebc(kjt([0, 0, 0, -1]))
    with pytest.raises(ValueError, match=r"feature 'f2': id 50"):
        ebc(kjt([0, 0, 50, 0]))
    with pytest.raises(ValueError, match="is_weighted=True"):
        ebc(kjt([0, 0, 0, 0], weights=False))
    with pytest.raises(TypeError, match="expected a KeyedJaggedTensor"):
        ebc({"f0": torch.tensor([0])})


def test_ebc_fp16_tables():
    gen = torch.Generator().manual_seed(2)
    ebc = EmbeddingBagCollection(TABLES, dtype=torch.float16, seed=1)
    kjt = _random_kjt(["f0", "f1", "f2", "f3"], {"f0": 3, "f1": 50, "f2": 50, "f3": 30}, 4, 6, False, gen)
    out = ebc(kjt).values()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(ebc, kjt, False), atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------- TorchRec interop


def test_torchrec_kjt_kt_roundtrip():
    _torchrec()
    ours = _kjt(weighted=True)
    theirs = ours.to_torchrec()
    back = as_kjt(theirs)
    assert back.keys() == ours.keys() and back.stride() == ours.stride()
    assert torch.equal(back.values(), ours.values()) and torch.equal(back.lengths(), ours.lengths())
    assert torch.equal(back.weights(), ours.weights())
    assert torch.equal(theirs.offsets(), ours.offsets())
    assert theirs.length_per_key() == ours.length_per_key()
    for k in ours.keys():
        assert torch.equal(theirs[k].values(), ours[k].values())
        assert torch.equal(theirs.to_dict()[k].lengths(), ours.to_dict()[k].lengths())
    kt = KeyedTensor(["x", "y"], [2, 4], torch.randn(3, 6))
    tkt = kt.to_torchrec()
    assert tkt.offset_per_key() == kt.offset_per_key()
    assert all(torch.equal(tkt[k], kt[k]) for k in kt.keys())
    assert torch.equal(as_kt(tkt).values(), kt.values()) and as_kt(tkt).keys() == kt.keys()


def _torchrec_ebc(tables, ours, weighted):
    tr = _torchrec()
    configs = [t.to_torchrec() for t in tables]
    theirs = tr.EmbeddingBagCollection(tables=configs, is_weighted=weighted, device=torch.device("cpu"))
    theirs.load_state_dict(ours.state_dict())  # same names, so this lines up
    return configs, theirs


@pytest.mark.parametrize("weighted", [False, True])
def test_ebc_equals_torchrec(weighted):
    # TorchRec's unsharded EBC runs nn.EmbeddingBag, which takes per-sample weights only with
    # sum pooling, so the weighted case uses sum tables (weighted mean is checked above).
    tables = [
        t
        if not weighted
        else EmbeddingBagConfig(t.name, t.num_embeddings, t.embedding_dim, t.feature_names, "sum")
        for t in TABLES
    ]
    ours = EmbeddingBagCollection(tables, seed=5, is_weighted=weighted)
    configs, theirs = _torchrec_ebc(tables, ours, weighted)
    gen = torch.Generator().manual_seed(7)
    rows = {"f0": 3, "f1": 50, "f2": 50, "f3": 30}
    for _ in range(3):
        kjt = _random_kjt(["f1", "f0", "f3", "f2"], rows, 5, 7, weighted, gen)
        a, b = ours(kjt), theirs(kjt.to_torchrec())
        assert a.keys() == b.keys() and a.length_per_key() == b.length_per_key()
        torch.testing.assert_close(a.values(), b.values(), atol=1e-6, rtol=1e-6)
        # TorchRec's KJT in, and TorchRec's configs in: the same answer.
        assert torch.equal(ours(kjt.to_torchrec()).values(), a.values())
    ours2 = EmbeddingBagCollection(configs, seed=5, is_weighted=weighted)
    ours2.load_state_dict(theirs.state_dict())
    assert torch.equal(ours2(kjt).values(), a.values())
