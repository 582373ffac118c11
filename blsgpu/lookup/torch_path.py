"""The torch path of the pooled lookup: one embedding_bag per table, written straight into the
table's column slice (CPU or CUDA tensors).
"""

from __future__ import annotations

from itertools import pairwise

import torch

from blsgpu.lookup.table import QuantizedTable

try:
    _QUANTIZED_BAG = torch.ops.quantized.embedding_bag_byte_rowwise_offsets
except (AttributeError, RuntimeError):  # torch built without the quantized CPU engine
    _QUANTIZED_BAG = None


def torch_lookup(tables, cols, indices, offsets, psw, out, n, mean, bounds) -> None:
    """Pool every bag into `out` (checked arguments; `bounds`: the tables' first ids, or None)."""
    if offsets.dtype != indices.dtype:
        offsets = offsets.to(indices.dtype)
    if bounds is None:  # validation skipped: read the table boundaries in the ids here
        bounds = offsets[::n].tolist()
    num_tables = len(tables)
    # Every table's offsets relative to its first id, [T, N + 1], in three ops instead of T.
    starts = offsets[:-1:n].view(num_tables, 1)
    rel = torch.empty((num_tables, n + 1), dtype=offsets.dtype, device=offsets.device)
    torch.sub(offsets[:-1].view(num_tables, n), starts, out=rel[:, :n])
    torch.sub(offsets[n::n].view(num_tables, 1), starts, out=rel[:, n:])
    # Per-table views in one call each (Python-level slicing costs microseconds per table).
    counts = [b - a for a, b in pairwise(bounds)]
    ids_t = indices.split(counts)
    psw_t = psw.split(counts) if psw is not None else (None,) * num_tables
    # torch's embedding_bag takes weights with "sum" only: a weighted mean sums, then divides.
    weighted_mean = mean and psw is not None
    mode = 1 if mean and not weighted_mean else 0
    pooled = []
    for table, ids, offs, weights in zip(tables, ids_t, rel.unbind(0), psw_t, strict=True):
        if isinstance(table, QuantizedTable):
            pooled.append(_quantized_bag(table, ids, offs, weights, mean))
            continue
        if weights is not None and weights.dtype != table.dtype:
            weights = weights.to(table.dtype)
        # The aten op itself: F.embedding_bag repeats checks that validation already made.
        bag = torch.embedding_bag(table, ids, offs, False, mode, False, weights, True, None)[0]
        pooled.append(_divide_by_counts(bag, offs) if weighted_mean else bag)
    # One cat into out (casting to its dtype, honouring its row stride) beats T slice copies.
    torch.cat(pooled, dim=1, out=out)


def _quantized_bag(table: QuantizedTable, ids, offs, weights, mean) -> torch.Tensor:
    """fp32 [N, D] pooled bags of an int8 row-wise table."""
    if weights is not None:
        weights = weights.float()
    if _QUANTIZED_BAG is not None and not table.data.is_cuda:
        # FBGEMM's fused 8-bit CPU kernel; it only sums, so mean divides afterwards.
        pooled = _QUANTIZED_BAG(table.data.contiguous(), ids, offs, False, 0, False, weights, None, True)
    else:
        # Generic path: gather the fused rows, dequantize them, then pool with embedding_bag over
        # positions 0..nnz-1 (a segment sum).
        d = table.embedding_dim
        rows = table.data.index_select(0, ids.long())
        qp = rows[:, d:].clone(memory_format=torch.contiguous_format).view(torch.float32)
        values = rows[:, :d].float() * qp[:, :1] + qp[:, 1:]
        positions = torch.arange(ids.numel(), device=ids.device, dtype=offs.dtype)
        pooled = torch.embedding_bag(values, positions, offs, False, 0, False, weights, True, None)[0]
    return _divide_by_counts(pooled, offs) if mean else pooled


def _divide_by_counts(pooled: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Mean from sum: each bag divided by its number of ids (an empty bag stays zero)."""
    counts = (offs[1:] - offs[:-1]).clamp_(min=1).to(torch.float32)
    return (pooled.float() / counts[:, None]).to(pooled.dtype)
