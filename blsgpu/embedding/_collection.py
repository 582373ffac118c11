"""Unsharded EmbeddingBagCollection: TorchRec's module, computed with the fused pooled lookup."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from blsgpu.embedding._config import as_configs, embedding_names
from blsgpu.embedding._jagged import KeyedJaggedTensor, KeyedTensor, as_kjt, offsets_of, to_device
from blsgpu.lookup import pooled_lookup
from blsgpu.transport.sizes import offsets


def init_weight(config, index: int, seed: int | None, dtype: torch.dtype, device=None) -> torch.Tensor:
    """TorchRec's default init, uniform(+-sqrt(1/rows)); with a seed, the same values for table
    `index` of a collection whatever the device or the sharding."""
    bound = math.sqrt(1.0 / config.num_embeddings)
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
    w = torch.empty(config.num_embeddings, config.embedding_dim, dtype=torch.float32)
    w.uniform_(-bound, bound, generator=gen)
    return w.to(device=device, dtype=dtype)


def check_features(
    kjt: KeyedJaggedTensor, features: list[str], rows: dict[str, int], is_weighted: bool
) -> list[int]:
    """Checks a KJT against the tables before any work: every feature present, ids in
    [0, rows), weights present when the collection is weighted. Returns each feature's key index."""
    keys = kjt.keys()
    index = {k: i for i, k in enumerate(keys)}
    missing = [f for f in features if f not in index]
    if missing:
        raise ValueError(
            f"KeyedJaggedTensor lacks features {missing} that the tables look up (its keys: {keys})"
        )
    if is_weighted and kjt.weights_or_none() is None:
        raise ValueError(
            "the collection is weighted (is_weighted=True) but the KeyedJaggedTensor has no weights"
        )
    values = kjt.values()
    if values.numel():
        # Per key, the smallest table the feature is looked up in; keys no table reads are free.
        opk = kjt.offset_per_key()
        checked = [(i, k) for i, k in enumerate(keys) if k in rows and opk[i + 1] > opk[i]]
        if not checked:  # the ids there are belong to keys no table reads
            ok = True
        elif values.is_cuda:  # one pass and one sync for all ids
            per_key = to_device(torch.tensor([opk[i + 1] - opk[i] for i, _ in checked]), values.device)
            limits = to_device(torch.tensor([rows[k] for _, k in checked]), values.device)
            ids = torch.cat([values[opk[i] : opk[i + 1]] for i, _ in checked])
            limits = limits.repeat_interleave(per_key, output_size=ids.numel())
            ok = not bool(((ids < 0) | (ids >= limits)).any())
        else:
            ok = _ids_in_range_cpu(values, [(opk[i], opk[i + 1], rows[k]) for i, k in checked])
        if not ok:
            for i, k in checked:
                seg = values[opk[i] : opk[i + 1]]
                bad = ((seg < 0) | (seg >= rows[k])).nonzero()
                if bad.numel():
                    raise ValueError(
                        f"feature {k!r}: id {int(seg[bad[0, 0]])} is out of range [0, {rows[k]})"
                    )
    return [index[f] for f in features]


_UNSIGNED = {torch.int64: np.uint64, torch.int32: np.uint32}


def _ids_in_range_cpu(values: torch.Tensor, spans: list[tuple[int, int, int]]) -> bool:
    """Every id in values[a:b] lies in [0, rows) for each non-empty (a, b, rows).

    One numpy pass for all keys: seen as unsigned, a negative id is at least 2^(bits-1), so a max
    per span against min(rows, 2^(bits-1)) catches both ends.
    """
    if not spans:
        return True
    unsigned = _UNSIGNED.get(values.dtype)
    if unsigned is None:  # other integer dtypes: a min and a max per span
        return all(
            int(lo) >= 0 and int(hi) < r
            for (lo, hi), r in ((torch.aminmax(values[a:b]), r) for a, b, r in spans)
        )
    v = values.numpy().view(unsigned)
    # Maxima over [a_0, b_0), [b_0, a_1), [a_1, b_1), ...; the odd ones are gaps, ignored.
    cuts = [x for a, b, _ in spans for x in (a, b)]
    if cuts[-1] == v.shape[0]:
        cuts.pop()
    hi = np.maximum.reduceat(v, cuts)[::2]
    top = torch.iinfo(values.dtype).max + 1
    return bool((hi < np.array([min(r, top) for _, _, r in spans], dtype=unsigned)).all())


def gather_bags(kjt: KeyedJaggedTensor, key_index: list[int], with_weights: bool):
    """Lengths, ids and weights of the given keys, in that order (a key may repeat)."""
    n, opk = kjt.stride(), kjt.offset_per_key()
    lengths = torch.cat([kjt.lengths()[i * n : (i + 1) * n] for i in key_index])
    values = torch.cat([kjt.values()[opk[i] : opk[i + 1]] for i in key_index])
    if values.dtype not in (torch.int32, torch.int64):
        values = values.long()  # ids of a narrower integer type (the lookup takes int32/int64)
    weights = None
    if with_weights:
        weights = torch.cat([kjt.weights()[opk[i] : opk[i + 1]] for i in key_index])
    return lengths, values, weights


class EmbeddingBagCollection(nn.Module):
    """Pooled embeddings of several tables for a KeyedJaggedTensor (TorchRec's module, unsharded).

    Weights live in `embedding_bags.<table>.weight` (nn.EmbeddingBag modules), so state_dicts line
    up with TorchRec's. forward returns a KeyedTensor [N, sum(D)] in float32, keys in table order
    (a feature looked up in several tables is keyed "feature@table"). As in TorchRec, KJT weights
    are used only when is_weighted=True; KJT keys that no table looks up are ignored.
    """

    def __init__(
        self,
        tables,
        device=None,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
        *,
        is_weighted: bool = False,
    ):
        super().__init__()
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self._tables = as_configs(tables)
        self._is_weighted = bool(is_weighted)
        self.embedding_bags = nn.ModuleDict()
        for i, t in enumerate(self._tables):
            w = init_weight(t, i, seed, dtype, device)
            bag = nn.EmbeddingBag(
                t.num_embeddings,
                t.embedding_dim,
                mode=t.pooling,
                include_last_offset=True,
                _weight=w,
                device=device,
                dtype=dtype,
            )
            bag.weight.requires_grad_(False)  # inference: no autograd bookkeeping
            self.embedding_bags[t.name] = bag
        self._features = [f for t in self._tables for f in t.feature_names]
        self._names = [n for names in embedding_names(self._tables) for n in names]
        self._dims = [t.embedding_dim for t in self._tables for _ in t.feature_names]
        self._rows: dict[str, int] = {}
        for t in self._tables:
            for f in t.feature_names:
                self._rows[f] = min(self._rows.get(f, t.num_embeddings), t.num_embeddings)

    def embedding_bag_configs(self):
        return list(self._tables)

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return next(iter(self.embedding_bags.values())).weight.device

    @torch.no_grad()
    def forward(self, features) -> KeyedTensor:
        kjt = as_kjt(features)
        key_index = check_features(kjt, self._features, self._rows, self._is_weighted)
        device = self.device
        if kjt.device() != device:
            kjt = kjt.to(device)
        n = kjt.stride()
        lengths, ids, weights = gather_bags(kjt, key_index, self._is_weighted)
        bag_offsets = offsets_of(lengths, ids.dtype)
        out = torch.empty(n, sum(self._dims), dtype=torch.float32, device=device)
        # One pooled lookup per run of tables with the same pooling, each into its columns of out.
        lpk = kjt.length_per_key()
        id_start = offsets(lpk[i] for i in key_index)
        slot, col = 0, 0
        runs: list[list[int]] = []
        for i, t in enumerate(self._tables):
            if runs and self._tables[runs[-1][0]].pooling == t.pooling:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            weights_t, dim = [], 0
            for i in run:
                t = self._tables[i]
                weights_t += [self.embedding_bags[t.name].weight] * len(t.feature_names)
                dim += t.embedding_dim * len(t.feature_names)
            s = len(weights_t)
            lo, hi = slot * n, (slot + s) * n
            o_lo, o_hi = id_start[slot], id_start[slot + s]
            # Weighted mean pools as FBGEMM's TBE (and so TorchRec's modules): sum(w * row) / L.
            pooled_lookup(
                weights_t,
                ids[o_lo:o_hi],
                bag_offsets[lo : hi + 1] - o_lo,
                per_sample_weights=None if weights is None else weights[o_lo:o_hi],
                pooling=self._tables[run[0]].pooling,
                out=out[:, col : col + dim],
                validate=False,
            )
            slot, col = slot + s, col + dim
        return KeyedTensor(self._names, self._dims, out)
