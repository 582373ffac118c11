"""The Triton path of the pooled lookup: tables grouped by weight kind and block width, one launch of
kernels/embedding_bag.py per group, the groups' metadata cached across calls.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import torch

from blsgpu.lookup.table import table_data


@dataclass(frozen=True)
class _Group:
    """Tables that one kernel launch covers: same weight kind and block width.

    Holds no tensor of the tables (the cache must not keep tables alive): `first` indexes the table
    whose data pointer is the launch's base; `meta` rows (int64 [G, 6], META_* columns of
    kernels/embedding_bag.py) address every member relative to it.
    """

    first: int
    meta: torch.Tensor
    max_dim: int
    quantized: bool
    qparams_aligned: bool  # every scale/bias is 4-byte aligned: load them as fp32 directly
    row_align: int  # power of two (elements) dividing every member's offset and row stride
    dim_align: int  # power of two dividing every member's D
    cols: tuple[int, ...]  # members' first output columns


_PLAN_CACHE: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 64


def _pow2_divisor(values: Sequence[int], cap: int) -> int:
    """Largest power of two <= cap dividing every value."""
    g = reduce(math.gcd, values, 0)
    p = 1
    while p * 2 <= cap and g % (p * 2) == 0:
        p *= 2
    return p


def _triton_groups(tables, dims, cols, device) -> list[_Group]:
    """The launches for these tables, cached by their addresses and shapes.

    In inference the same tables serve every batch; rebuilding the metadata would cost a
    host-to-device copy per call. A table freed and another allocated at the same address with the
    same shape gets the same (still correct) plan.
    """
    from blsgpu.kernels import embedding_bag as kern

    datas = [table_data(t) for t in tables]
    key = (device, tuple((str(d.dtype), d.data_ptr(), *d.shape, d.stride(0)) for d in datas))
    plan = _PLAN_CACHE.get(key)
    if plan is not None:
        _PLAN_CACHE.move_to_end(key)
        return plan
    buckets: dict = {}
    for t, data in enumerate(datas):
        block_d = min(1 << max(dims[t] - 1, 0).bit_length(), kern.MAX_BLOCK_D)
        buckets.setdefault((data.dtype, block_d), []).append(t)
    plan = []
    for (dtype, _), members in buckets.items():
        base = datas[members[0]]
        elsize = base.element_size()
        cap = max(16 // elsize, 1)  # 16-byte vectors
        rows_meta = [
            [(datas[t].data_ptr() - base.data_ptr()) // elsize, datas[t].shape[0], dims[t],
             datas[t].stride(0), cols[t], t]
            for t in members
        ]  # fmt: skip
        quantized = dtype == torch.uint8
        plan.append(
            _Group(
                first=members[0],
                meta=torch.tensor(rows_meta, dtype=torch.int64).to(device),
                max_dim=max(dims[t] for t in members),
                quantized=quantized,
                qparams_aligned=quantized
                and all((base.data_ptr() + m[0] + m[2]) % 4 == 0 and m[3] % 4 == 0 for m in rows_meta),
                row_align=_pow2_divisor([m[0] for m in rows_meta] + [m[3] for m in rows_meta], cap),
                dim_align=_pow2_divisor([dims[t] for t in members], cap),
                cols=tuple(cols[t] for t in members),
            )
        )
    _PLAN_CACHE[key] = plan
    if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


def triton_lookup(tables, dims, cols, indices, offsets, psw, out, mean) -> None:
    """Pool every bag into `out`, one kernel launch per group of tables (checked arguments)."""
    from blsgpu.kernels.embedding_bag import launch_pooled_gather

    n = out.shape[0]
    avg_pooling = indices.numel() / max(len(tables) * n, 1)
    out_cap = max(16 // out.element_size(), 1)
    for group in _triton_groups(tables, dims, cols, out.device):
        launch_pooled_gather(
            table_data(tables[group.first]),
            group.meta,
            indices,
            offsets,
            psw,
            out,
            max_dim=group.max_dim,
            avg_pooling=avg_pooling,
            mean=mean,
            quantized=group.quantized,
            qparams_aligned=group.qparams_aligned,
            row_align=group.row_align,
            dim_align=group.dim_align,
            out_align=_pow2_divisor([out.stride(0), *group.cols], out_cap),
        )
