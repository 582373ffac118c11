"""Dense half of DLRM: arch parsing, dot interaction against a naive loop, shapes, determinism."""

import pytest
import torch

from blsgpu.dlrm import MLP, DLRMArch, DLRMDense, interact_dot, interaction_width, parse_arch


def naive_interact(x, embs):
    # facebookresearch/dlrm interact_features, arch-interaction-op dot, itself=False, one sample at
    # a time: x, then dot(T_i, T_j) for i in 0..F-1, j < i.
    feats = [x] + embs
    rows = []
    for n in range(x.shape[0]):
        z = [torch.dot(feats[i][n], feats[j][n]) for i in range(len(feats)) for j in range(i)]
        rows.append(torch.cat([x[n], torch.stack(z)]))
    return torch.stack(rows)


@pytest.mark.parametrize("T,D", [(1, 4), (3, 8), (26, 16)])
def test_interaction_matches_naive_loop(T, D):
    g = torch.Generator().manual_seed(T)
    N = 5
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    embs = [torch.randn(N, D, generator=g, dtype=torch.float64) for _ in range(T)]
    out = interact_dot(x, torch.cat(embs, dim=1))
    assert out.shape == (N, interaction_width(D, T)) == (N, D + T * (T + 1) // 2)
    torch.testing.assert_close(out, naive_interact(x, embs))


def test_arch_reference_sizes():
    arch = DLRMArch.parse("13-512-256-64", "512-256-1", "-".join(["100000"] * 26), 64)
    assert arch.bottom == (13, 512, 256, 64)
    assert arch.top == (64 + 351, 512, 256, 1)  # 27 vectors: 27 * 26 / 2 pairs
    assert arch.num_tables == 26 and arch.sparse_feature_size == 64
    assert DLRMArch.parse([13, 8], [4, 1], [10, 20]).top == (8 + 3, 4, 1)


@pytest.mark.parametrize(
    "bot,top,emb,D,match",
    [
        ("13-512-256-32", "512-256-1", "100-100", 64, "must be D wide"),
        ("12-64", "16-1", "100", None, "13 dense features"),
        ("13", "16-1", "100", None, "at least one layer"),
        ("13-64", "16-2", "100", None, "must end in 1"),
        ("13-6x4", "16-1", "100", None, "integers joined by '-'"),
        ("13-64", "16-1", "100-0", None, "each >= 1"),
        ("13-64", "16-1", "", None, "--arch-embedding-size"),
    ],
)
def test_arch_validation_errors(bot, top, emb, D, match):
    with pytest.raises(ValueError, match=match):
        DLRMArch.parse(bot, top, emb, D)


def test_parse_arch():
    assert parse_arch(" 13-512-1 ") == (13, 512, 1)
    assert parse_arch([3, 4]) == (3, 4)


def test_mlp_layers():
    m = MLP("4-8-2", sigmoid_last=True)
    kinds = [type(layer).__name__ for layer in m]
    assert kinds == ["Linear", "ReLU", "Linear", "Sigmoid"]
    assert [type(layer).__name__ for layer in MLP("4-8-2")][-1] == "ReLU"  # bottom: like the reference
    y = m(torch.randn(3, 4))
    assert y.shape == (3, 2) and ((y > 0) & (y < 1)).all()


def model(seed=0):
    return DLRMDense.from_flags("13-32-16", "32-8-1", "100-200-300", 16, seed=seed)


def test_forward_shapes_and_list_input():
    m = model()
    N, T, D = 7, 3, 16
    dense = torch.rand(N, 13)
    embs = [torch.randn(N, D) for _ in range(T)]
    with torch.inference_mode():
        y = m(dense, torch.cat(embs, dim=1))
        assert y.shape == (N,) and y.dtype == torch.float32
        assert ((y > 0) & (y < 1)).all()
        assert torch.equal(y, m(dense, embs))
    with pytest.raises(ValueError, match="pooled"):
        m(dense, torch.randn(N, T * D + 1))
    with pytest.raises(ValueError, match="dense"):
        m(torch.rand(N, 12), embs)


def test_deterministic_init():
    a, b, c = model(0), model(0), model(1)
    for (_, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.bot[0].weight, c.bot[0].weight)
    dense, pooled = torch.rand(4, 13), torch.randn(4, 48)
    with torch.inference_mode():
        assert torch.equal(a(dense, pooled), b(dense, pooled))


def test_batch_independence():
    # each sample's prediction depends on that sample only (what lets ranks own their samples)
    m = model()
    dense, pooled = torch.rand(6, 13), torch.randn(6, 48)
    with torch.inference_mode():
        full = m(dense, pooled)
        torch.testing.assert_close(full[2:4], m(dense[2:4], pooled[2:4]))
